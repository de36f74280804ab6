"""The snapshots of one folder (SnapshotStore): read-only btrfs snapshots where the folder is a
subvolume, else age-encrypted tar streams, taken and pruned atomically.

    000007-20250612T101530Z-stop.tar.age     one snapshot: id 7, taken at a stop
    000008-20250612T101702Z-manual.snap      a btrfs snapshot
    latest -> 000008-20250612T101702Z-manual.snap

The plaintext of a copy never touches a disk: the tar goes to `age` through a FIFO in memory.
Each operation works in a temporary folder `.tmp-<random>/` (the FIFO, the ciphertext being
written, the next `latest` link); the ciphertext is fsynced, renamed to its final name (never
over another), the folder fsynced, then `latest` is replaced by a rename. Only names of the
final form are snapshots, so a crash never shows a partial one.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import select
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from qnix.audit.events import FieldValue
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime import btrfs
from qnix.runtime.archives import Entry, archive_manifest, tree_manifest, unpack_tree, write_tree

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


log = logging.getLogger("qnix.state")

LATEST = "latest"
SUFFIX = ".tar.age"  # an age-encrypted tar stream of the home
BTRFS_SUFFIX = ".snap"  # a read-only btrfs snapshot of the home (a folder)
TEMP_PREFIX = ".tmp-"
REASONS = ("stop", "manual", "pre-restore")
SNAPSHOT_RE = re.compile(
    r"(?P<id>[0-9]{6,})-(?P<time>[0-9]{8}T[0-9]{6}Z)-(?P<reason>stop|manual|pre-restore)"
    + rf"(?P<suffix>{re.escape(SUFFIX)}|{re.escape(BTRFS_SUFFIX)})\Z"
)
# A large home takes a while; a hung age is still cut off eventually.
AGE_TIMEOUT = 6 * 3600.0
CHUNK = 1 << 20
_POLL = 0.05

# ---- small pieces -------------------------------------------------------------------------------


def message_of(exc: BaseException) -> str:
    return exc.message if isinstance(exc, QnixError) else f"{type(exc).__name__}: {exc}"


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _renameat2(old: Path, new: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where the C library or the file system lacks it."""
    try:
        call = _libc().renameat2
    except AttributeError:
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    if call(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(number, os.strerror(number), str(old), None, str(new))


def _rename_noreplace(old: Path, new: Path) -> None:
    """Rename, never over an existing `new`."""
    if not _renameat2(old, new, _RENAME_NOREPLACE):
        os.link(old, new)  # fails if `new` exists
        os.unlink(old)


def exchange(first: Path, second: Path) -> None:
    """Swap two folders in one step; two renames where the file system cannot."""
    if _renameat2(first, second, _RENAME_EXCHANGE):
        return
    aside = first.with_name(first.name + ".aside")
    os.rename(second, aside)
    os.rename(first, second)
    os.rename(aside, first)


def syncfs(path: Path) -> None:
    """Flush the file system holding `path` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), str(path))
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- age through a FIFO --------------------------------------------------------------------------


class _AgeJob:
    """`age` run through the one runner in a thread, while this thread feeds or drains the FIFO
    it reads or writes (the runner takes text only; a FIFO keeps the plaintext off the disk)."""

    def __init__(self, argv: list[str]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)

    def _run(self, argv: list[str]) -> None:
        try:
            run(argv, timeout=AGE_TIMEOUT)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def finish(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise QnixError(f"age failed: {message_of(self.error)}") from self.error


def _age() -> str:
    return require_tool("age", "age")


def _open_writer(pipe: Path, job: _AgeJob) -> int:
    """The FIFO's write end, once age has it open for reading (or age's error)."""
    while True:
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if job.done():
                job.finish()
                raise QnixError("age ended without reading the archive") from exc
            time.sleep(0.005)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd


@contextlib.contextmanager
def _encrypting(work: Path, output: Path, recipients: Sequence[str]) -> Iterator[IO[bytes]]:
    """A stream whose bytes age encrypts into `output`; complete once the block ends."""
    pipe = work / "pipe"
    os.mkfifo(pipe, 0o600)
    argv = [_age(), "--encrypt"]
    for recipient in recipients:
        argv += ["--recipient", recipient]
    job = _AgeJob([*argv, "--output", str(output), str(pipe)])
    job.start()
    try:
        fd = _open_writer(pipe, job)
    except BaseException:
        _poke(pipe)  # an age still waiting for us reads an empty stream and ends
        job.thread.join()
        raise
    stream = open(fd, "wb", buffering=CHUNK)  # noqa: SIM115
    try:
        yield stream
    except BaseException:
        with contextlib.suppress(OSError):
            stream.close()  # age reads the end and exits; its output is thrown away
        job.thread.join()
        if job.error is not None:
            job.finish()  # age's own error explains a broken pipe best
        raise
    try:
        stream.close()
    except BrokenPipeError:
        job.finish()
        raise
    job.finish()


class _PipeReader(io.RawIOBase):
    """The read end of a FIFO age decrypts into. Opened before age starts, so that age never
    waits for a reader; end of data is age closing it, or age ending without writing."""

    def __init__(self, fd: int, job: _AgeJob) -> None:
        super().__init__()
        self.fd = fd
        self.job = job
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self.ended:
            ready = select.select([self.fd], [], [], _POLL)[0]
            if not ready:
                if self.job.done() and not select.select([self.fd], [], [], 0)[0]:
                    self.ended = True  # age ended without ever writing
                continue
            try:
                count = os.readv(self.fd, [buffer])
            except BlockingIOError:
                continue
            if count:
                return count
            self.ended = True
        self.job.finish()  # a failed decryption (a truncated or altered file) is an error
        return 0

    def drain(self) -> None:
        """Read to the end, so age finishes (and says whether the whole file was authentic)."""
        sink = bytearray(CHUNK)
        while self.readinto(memoryview(sink)):
            pass

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


@contextlib.contextmanager
def _decrypting(work: Path, ciphertext: Path, identity: Path) -> Iterator[IO[bytes]]:
    """The plaintext of `ciphertext` as a stream. Leaving the block without an error means age
    authenticated all of it."""
    pipe = work / "pipe"
    os.mkfifo(pipe, 0o600)
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    job = _AgeJob(
        [_age(), "--decrypt", "--identity", str(identity), "--output", str(pipe), str(ciphertext)]
    )
    reader = _PipeReader(fd, job)
    job.start()
    finished = False
    try:
        yield io.BufferedReader(reader, CHUNK)
        reader.drain()
        finished = True
    finally:
        if not finished:
            # Let age end before its FIFO goes: a FIFO removed under it would become a file.
            with contextlib.suppress(Exception):
                reader.drain()
            job.thread.join()
        reader.close()


def _poke(pipe: Path) -> None:
    """Wake an age process that a killed qnix left waiting to open `pipe`, so that it ends."""
    with contextlib.suppress(OSError):
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        os.close(reader)


# ---- the snapshots of one folder -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    time: str  # UTC, ISO 8601
    reason: str  # stop, manual, pre-restore
    path: Path
    kind: str  # "age": an encrypted tar file; "btrfs": a read-only subvolume
    size: int | None  # of the ciphertext; None for a btrfs snapshot (it shares its blocks)

    def fingerprint(self) -> str:
        """What the audit event of its making recorded: the SHA-256 of the ciphertext, or the
        btrfs snapshot's UUID."""
        return btrfs.uuid(self.path) if self.kind == "btrfs" else _sha256_file(self.path)

    def recorded(self) -> dict[str, FieldValue]:
        """Its fields in the `snapshot` audit event."""
        if self.kind == "btrfs":
            return {"kind": "btrfs", "uuid": self.fingerprint()}
        return {"kind": "age", "size": self.size, "sha256": self.fingerprint()}


def _parse(path: Path) -> Snapshot | None:
    match = SNAPSHOT_RE.fullmatch(path.name)
    if match is None:
        return None
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    stamp = match["time"]
    when = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
    if match["suffix"] == BTRFS_SUFFIX:
        if info.st_ino != btrfs.SUBVOLUME_ROOT_INODE or not stat.S_ISDIR(info.st_mode):
            return None
        return Snapshot(int(match["id"]), when, match["reason"], path, "btrfs", None)
    if not stat.S_ISREG(info.st_mode):
        return None
    return Snapshot(int(match["id"]), when, match["reason"], path, "age", info.st_size)


def remove_snapshot_path(path: Path) -> None:
    """Remove what an operation made or left, subvolumes included; a failure is only logged
    (the next operation or `qnix gc` tries again)."""
    try:
        btrfs.remove_tree(path)
    except (OSError, QnixError) as exc:
        log.warning("cannot remove %s: %s", path, message_of(exc))


class SnapshotStore:
    """The snapshots folder of one state folder. The caller serialises changes (the run
    root's lock): the store itself assumes no other writer."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def snapshots(self) -> list[Snapshot]:
        """Complete snapshots, oldest first. Nothing else in the folder is one."""
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = [_parse(self.folder / entry) for entry in entries]
        return sorted((s for s in found if s is not None), key=lambda s: s.id)

    def latest(self) -> Snapshot | None:
        """The one `latest` points at."""
        try:
            target = os.readlink(self.folder / LATEST)
        except OSError:
            return None
        if "/" in target:
            return None
        return _parse(self.folder / target)

    def find(self, snapshot_id: int | None, compartment: str) -> Snapshot:
        """Snapshot `snapshot_id`; None: the latest (the newest where `latest` is missing)."""
        found = self.snapshots()
        if snapshot_id is None:
            chosen = self.latest() or (found[-1] if found else None)
            if chosen is None:
                raise QnixError(
                    f"{compartment} has no snapshots",
                    hint=f"one is taken at every stop; qnix state snapshot {compartment} takes "
                    "one now",
                )
            return chosen
        for snapshot in found:
            if snapshot.id == snapshot_id:
                return snapshot
        raise QnixError(
            f"{compartment} has no snapshot {snapshot_id}",
            hint=f"qnix state ls {compartment} lists them",
        )

    def _ensure_folder(self) -> None:
        if not self.folder.is_dir():
            self.folder.mkdir(mode=0o700)
            fsync_dir(self.folder.parent)
        self.folder.chmod(0o700)

    def _workspace(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.folder, prefix=TEMP_PREFIX))

    def remove_temporaries(self) -> list[str]:
        """Remove what an interrupted operation left; the names removed."""
        removed = []
        try:
            entries = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.startswith(TEMP_PREFIX):
                continue
            path = self.folder / entry
            if path.is_dir() and not path.is_symlink():
                pipe = path / "pipe"
                with contextlib.suppress(OSError):
                    if stat.S_ISFIFO(os.stat(pipe, follow_symlinks=False).st_mode):
                        _poke(pipe)
            remove_snapshot_path(path)
            removed.append(entry)
        return removed

    def take(self, source: Path, recipients: Sequence[str], reason: str, keep: int) -> Snapshot:
        """Snapshot `source` and point `latest` at it; then keep the latest `keep` (0: all).
        A btrfs subvolume gets a read-only btrfs snapshot, any other folder an encrypted copy."""
        if reason not in REASONS:
            raise ValueError(f"unknown snapshot reason {reason!r}")
        self._ensure_folder()
        self.remove_temporaries()
        existing = self.snapshots()
        latest = self.latest()
        number = max([s.id for s in existing] + [latest.id if latest else 0]) + 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        copy_on_write = btrfs.is_subvolume(source)
        suffix = BTRFS_SUFFIX if copy_on_write else SUFFIX
        final = self.folder / f"{number:06d}-{stamp}-{reason}{suffix}"
        work = self._workspace()
        try:
            partial = work / "snapshot"
            if copy_on_write:
                # Beside its final name: a read-only subvolume cannot move to another folder.
                partial = Path(f"{work}{BTRFS_SUFFIX}")
                btrfs.snapshot(source, partial, readonly=True)  # committed when it returns
            else:
                with _encrypting(work, partial, recipients) as stream:
                    write_tree(source, stream)
                _fsync_path(partial)
            _rename_noreplace(partial, final)
            fsync_dir(self.folder)
            self._point_latest(work, final.name)
        finally:
            remove_snapshot_path(work)
            remove_snapshot_path(Path(f"{work}{BTRFS_SUFFIX}"))
        taken = _parse(final)
        assert taken is not None
        self.prune(keep)
        return taken

    def _point_latest(self, work: Path, target: str) -> None:
        link = work / LATEST
        os.symlink(target, link)
        os.replace(link, self.folder / LATEST)
        fsync_dir(self.folder)

    def prune(self, keep: int) -> list[Snapshot]:
        """Remove all but the latest `keep` snapshots (and the one `latest` names); 0 keeps all."""
        if keep <= 0:
            return []
        latest = self.latest()
        found = self.snapshots()
        kept = {s.id for s in found[-keep:]} | ({latest.id} if latest else set())
        removed = [s for s in found if s.id not in kept]
        for snapshot in removed:
            remove_snapshot_path(snapshot.path)
        if removed:
            fsync_dir(self.folder)
        return removed

    @contextlib.contextmanager
    def plaintext(self, snapshot: Snapshot, identity: Path) -> Iterator[IO[bytes]]:
        """An age snapshot's tar stream, authenticated by age once the block ends."""
        if snapshot.kind != "age":
            raise ValueError("only an age snapshot is a stream")
        self._ensure_folder()
        work = self._workspace()
        try:
            with _decrypting(work, snapshot.path, identity) as stream:
                yield stream
        finally:
            remove_snapshot_path(work)

    def unpack(self, snapshot: Snapshot, identity: Path, dest: Path, owner: tuple[int, int]) -> int:
        """Fill the empty folder `dest` with an age snapshot's tree; the number of entries."""
        with self.plaintext(snapshot, identity) as stream:
            return unpack_tree(stream, dest, owner)

    def manifest(self, snapshot: Snapshot, identity: Path | None) -> dict[str, Entry]:
        """What the snapshot holds; `identity` opens an age snapshot (a btrfs one needs none)."""
        if snapshot.kind == "btrfs":
            return tree_manifest(snapshot.path)
        if identity is None:
            raise ValueError("an age snapshot opens only with the host identity")
        with self.plaintext(snapshot, identity) as stream:
            return archive_manifest(stream)
