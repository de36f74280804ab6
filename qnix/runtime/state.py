"""A persistent compartment's state at rest: versioned snapshots of its home.

The state folder is the compartment's home under the state root
(`<state root>/compartments/<name>/home`, owned by its host uid, 0700). Its snapshots live beside
it in `<state root>/compartments/<name>/snapshots/` (root only, 0700):

    000007-20250612T101530Z-stop.tar.age     one snapshot: id 7, taken at a stop
    000008-20250612T101702Z-manual.snap      a btrfs snapshot
    latest -> 000008-20250612T101702Z-manual.snap

* Where the home is a btrfs subvolume (qnix apply makes it one on btrfs), a snapshot is a
  read-only btrfs snapshot: instant, copy-on-write, one point in time; it is protected at rest
  like the home, by the disk's encryption. Anywhere else it is a copy: a tar stream (PAX) of the
  folder, encrypted with `age` to the host's recipient (the public key of the host identity:
  `--identity FILE`, QNIX_AGE_IDENTITY, or /etc/qnix/host.agekey; see qnix.runtime.secrets).
  The plaintext never touches a disk: the tar goes to `age` through a FIFO in memory.
* The tree is read through file descriptors opened with O_NOFOLLOW relative to their folder, so
  a symlink is stored as a symlink and never followed, even if the compartment swaps a file for
  one while it is read (`--force`). Other file systems mounted inside, FIFOs, sockets and device
  nodes are left out. Hard links within the folder stay hard links.
* One is taken at every stop of a persistent compartment and on demand; the spec's
  `snapshots = N` keeps the latest N (0: none at stop, nothing removed).
* Atomic: each operation works in a temporary folder `snapshots/.tmp-<random>/` (the FIFO, the
  ciphertext being written, the next `latest` link); the ciphertext is fsynced, renamed to its
  final name (never over another), the folder fsynced, then `latest` is replaced by a rename.
  Only names of the final form are snapshots, so a crash never shows a partial one; the next
  snapshot, restore or `qnix gc` removes what a crash left.
* Restore makes a writable snapshot of a btrfs snapshot, or decrypts and unpacks a copy, into
  `.restore-<random>/` beside the home. Unpacking refuses any member that could write outside
  it (absolute names, `..`, a path through a link or a file, a hard link to anything but an
  earlier file of the archive, device nodes, FIFOs, duplicates), and what it writes is owned
  by the compartment's host uid, without setuid, setgid or sticky bits. Restore keeps the current
  state as a snapshot first and then swaps the two folders with one renameat2(RENAME_EXCHANGE).
  Symlinks are restored as they were stored, whatever they point at (inside the compartment an
  absolute link points into its own view): nothing here ever follows one.
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
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from qnix.audit import events
from qnix.audit.events import FieldValue
from qnix.errors import QnixError
from qnix.runtime import btrfs
from qnix.runtime.paths import PathError, RuntimePaths, is_name
from qnix.runtime.runner import require_tool, run

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from qnix.spec.model import Compartment, Workstation

log = logging.getLogger("qnix.state")

SNAPSHOT_DIR = "snapshots"
LATEST = "latest"
SUFFIX = ".tar.age"  # an age-encrypted tar stream of the home
BTRFS_SUFFIX = ".snap"  # a read-only btrfs snapshot of the home (a folder)
TEMP_PREFIX = ".tmp-"
RESTORE_PREFIX = ".restore-"
REASONS = ("stop", "manual", "pre-restore")
SNAPSHOT_RE = re.compile(
    r"(?P<id>[0-9]{6,})-(?P<time>[0-9]{8}T[0-9]{6}Z)-(?P<reason>stop|manual|pre-restore)"
    + rf"(?P<suffix>{re.escape(SUFFIX)}|{re.escape(BTRFS_SUFFIX)})\Z"
)
# A large home takes a while; a hung age is still cut off eventually.
AGE_TIMEOUT = 6 * 3600.0
CHUNK = 1 << 20
PERMISSION_BITS = 0o777  # setuid, setgid and sticky bits are never restored
_POLL = 0.05


# ---- small pieces -------------------------------------------------------------------------------


def shown(untrusted_name: str) -> str:
    """A file name from a compartment, safe to print: backslash escapes for anything not
    printable (control characters, line breaks, bidi controls, bytes that are not UTF-8)."""
    out = []
    for character in untrusted_name:
        code = ord(character)
        if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
            out.append(f"\\x{code - 0xDC00:02x}")
        elif character == "\\":
            out.append("\\\\")
        elif character.isprintable():
            out.append(character)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, QnixError) else f"{type(exc).__name__}: {exc}"


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
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


def _exchange(first: Path, second: Path) -> None:
    """Swap two folders in one step; two renames where the file system cannot."""
    if _renameat2(first, second, _RENAME_EXCHANGE):
        return
    aside = first.with_name(first.name + ".aside")
    os.rename(second, aside)
    os.rename(first, second)
    os.rename(aside, first)


def _syncfs(path: Path) -> None:
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
            raise QnixError(f"age failed: {_message(self.error)}") from self.error


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


# ---- walking a live folder -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Found:
    """One entry of a folder: its path below the folder, its stat, and for a regular file an
    open handle, for a symlink its target, for a second name of a file the first one."""

    name: str
    info: os.stat_result
    handle: IO[bytes] | None = None
    target: str | None = None
    same_as: str | None = None


def _walk(folder: Path) -> Iterator[_Found]:
    """Every file, folder and symlink under `folder`, a folder before what it holds, in name
    order, opened relative to its folder with O_NOFOLLOW: no symlink is ever followed."""
    root_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    device = os.fstat(root_fd).st_dev
    first_names: dict[tuple[int, int], str] = {}
    stack: list[tuple[int, str, Iterator[str]]] = [(root_fd, "", iter(sorted(os.listdir(root_fd))))]
    try:
        while stack:
            dir_fd, prefix, pending = stack[-1]
            entry = next(pending, None)
            if entry is None:
                os.close(dir_fd)
                stack.pop()
                continue
            name = prefix + entry
            try:
                info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    child = os.open(entry, flags, dir_fd=dir_fd)
                    info = os.fstat(child)
                    if info.st_dev != device:
                        os.close(child)  # another file system mounted here: not ours to copy
                        continue
                    listing = iter(sorted(os.listdir(child)))
                    stack.append((child, name + "/", listing))
                    yield _Found(name, info)
                elif stat.S_ISLNK(info.st_mode):
                    yield _Found(name, info, target=os.readlink(entry, dir_fd=dir_fd))
                elif stat.S_ISREG(info.st_mode):
                    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                    fd = os.open(entry, flags, dir_fd=dir_fd)
                    with open(fd, "rb", buffering=0) as handle:
                        info = os.fstat(fd)
                        if not stat.S_ISREG(info.st_mode):
                            continue  # swapped for something else since
                        key = (info.st_dev, info.st_ino)
                        if info.st_nlink > 1 and key in first_names:
                            yield _Found(name, info, same_as=first_names[key])
                        else:
                            if info.st_nlink > 1:
                                first_names[key] = name
                            yield _Found(name, info, handle=handle)
                # FIFOs, sockets and device nodes are not state worth keeping.
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed or swapped meanwhile (a running compartment, --force)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # swapped for a symlink meanwhile: not followed
                raise
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)


class _Exactly(io.RawIOBase):
    """`size` bytes of a file that may shrink while it is read (a running compartment): cut
    at `size`, padded with zeros, so the archive stays well-formed."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        super().__init__()
        self.handle = handle
        self.remaining = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.remaining)
        if wanted == 0:
            return 0
        data = self.handle.read(wanted) or bytes(wanted)
        view[: len(data)] = data
        self.remaining -= len(data)
        return len(data)


def _member(found: _Found) -> tarfile.TarInfo:
    member = tarfile.TarInfo(found.name)
    info = found.info
    member.mode = stat.S_IMODE(info.st_mode)
    member.uid, member.gid = info.st_uid, info.st_gid
    member.uname = member.gname = ""
    member.mtime = info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
    elif found.target is not None:
        member.type, member.linkname = tarfile.SYMTYPE, found.target
    elif found.same_as is not None:
        member.type, member.linkname = tarfile.LNKTYPE, found.same_as
    else:
        member.type, member.size = tarfile.REGTYPE, info.st_size
    return member


def write_tree(folder: Path, out: IO[bytes]) -> int:
    """Write `folder` as a tar stream to `out`; the number of entries."""
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for found in _walk(folder):
            member = _member(found)
            if found.handle is not None:
                archive.addfile(member, io.BufferedReader(_Exactly(found.handle, member.size)))
            else:
                archive.addfile(member)
            count += 1
    return count


# ---- manifests and differences -----------------------------------------------------------------

# What a comparison looks at: kind, permission bits, and the content's sha256 or the link's
# target. Times and owners are not compared (every file is the compartment's).
Entry = tuple[str, ...]


def _content_sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def tree_manifest(folder: Path) -> dict[str, Entry]:
    """The live folder's entries (read the same way a snapshot reads it)."""
    manifest: dict[str, Entry] = {}
    for found in _walk(folder):
        mode = f"{stat.S_IMODE(found.info.st_mode) & PERMISSION_BITS:04o}"
        if stat.S_ISDIR(found.info.st_mode):
            manifest[found.name] = ("folder", mode)
        elif found.target is not None:
            manifest[found.name] = ("symlink", found.target)
        elif found.same_as is not None:
            manifest[found.name] = manifest[found.same_as]
        elif found.handle is not None:
            manifest[found.name] = ("file", mode, _content_sha256(found.handle))
    return manifest


def archive_manifest(untrusted_stream: IO[bytes]) -> dict[str, Entry]:
    """The entries of a snapshot's tar stream, without writing anything."""
    manifest: dict[str, Entry] = {}
    with _reading(untrusted_stream) as archive:
        for member in archive:
            mode = f"{member.mode & PERMISSION_BITS:04o}"
            if member.isdir():
                manifest[member.name] = ("folder", mode)
            elif member.issym():
                manifest[member.name] = ("symlink", member.linkname)
            elif member.islnk():
                manifest[member.name] = manifest.get(member.linkname, ("link", member.linkname))
            elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                content = archive.extractfile(member)
                assert content is not None
                manifest[member.name] = ("file", mode, _content_sha256(content))
            else:
                manifest[member.name] = ("other", member.type.decode(errors="replace"))
    return manifest


@dataclasses.dataclass(frozen=True, slots=True)
class Diff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {
            "added": [shown(name) for name in self.added],
            "removed": [shown(name) for name in self.removed],
            "changed": [shown(name) for name in self.changed],
        }


def compare(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> Diff:
    """Names only in `after`, only in `before`, and in both with another kind, permission
    bits, content or link target."""
    return Diff(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
    )


# ---- unpacking an untrusted archive --------------------------------------------------------------


class UnsafeMember(QnixError):
    """An archive member a restore refuses."""


@contextlib.contextmanager
def _reading(untrusted_stream: IO[bytes]) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(fileobj=untrusted_stream, mode="r|") as archive:
            yield archive
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise QnixError(f"the snapshot is not a readable archive: {exc}") from exc


def checked_member_name(untrusted_name: str) -> str:
    """A member name that stays inside the folder it is unpacked into: relative, no empty,
    `.` or `..` component."""
    if not untrusted_name or "\0" in untrusted_name:
        raise UnsafeMember(f"a member has an empty or invalid name: {shown(untrusted_name)!r}")
    if untrusted_name.startswith("/"):
        raise UnsafeMember(f"member {shown(untrusted_name)!r} has an absolute name")
    if any(part in ("", ".", "..") for part in untrusted_name.split("/")):
        raise UnsafeMember(
            f"member {shown(untrusted_name)!r} is not in normal form (no '', '.' or '..' parts)"
        )
    return untrusted_name


def _set_mtime(path: Path, mtime: float) -> None:
    with contextlib.suppress(OverflowError, ValueError, OSError):
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def unpack_tree(untrusted_stream: IO[bytes], dest: Path, owner: tuple[int, int]) -> int:
    """Unpack a snapshot's tar stream into `dest`, a fresh empty folder only we can write to,
    every entry owned by `owner`; the number of entries. A member that could reach outside
    `dest` (or is anything but a file, folder or link) refuses the whole archive: the caller
    throws `dest` away."""
    folders = {""}  # made from this archive: the only parents a member may have
    files: set[str] = set()  # regular files, the only targets a hard link may have
    seen: set[str] = set()
    folder_times: list[tuple[Path, float]] = []
    uid, gid = owner
    with _reading(untrusted_stream) as archive:
        for untrusted in archive:
            name = checked_member_name(untrusted.name)
            if name in seen:
                raise UnsafeMember(f"member {shown(name)!r} appears twice")
            parent = name.rpartition("/")[0]
            if parent not in folders:
                raise UnsafeMember(
                    f"member {shown(name)!r} is not inside a folder of the archive "
                    "(a path through a link or a file)"
                )
            seen.add(name)
            path = dest / name
            mode = untrusted.mode & PERMISSION_BITS
            if untrusted.type == tarfile.DIRTYPE:
                os.mkdir(path, 0o700)
                os.chown(path, uid, gid, follow_symlinks=False)
                os.chmod(path, mode, follow_symlinks=False)
                folders.add(name)
                folder_times.append((path, untrusted.mtime))
            elif untrusted.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(path, flags, 0o600)
                with open(fd, "wb") as out:
                    content = archive.extractfile(untrusted)
                    assert content is not None
                    shutil.copyfileobj(content, out, CHUNK)
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                _set_mtime(path, untrusted.mtime)
                files.add(name)
            elif untrusted.type == tarfile.SYMTYPE:
                if not untrusted.linkname or "\0" in untrusted.linkname:
                    raise UnsafeMember(f"symlink {shown(name)!r} has no valid target")
                # Stored as it was; never followed here (every call below acts on the link).
                os.symlink(untrusted.linkname, path)
                os.chown(path, uid, gid, follow_symlinks=False)
                _set_mtime(path, untrusted.mtime)
            elif untrusted.type == tarfile.LNKTYPE:
                if untrusted.linkname not in files:
                    raise UnsafeMember(
                        f"hard link {shown(name)!r} points at {shown(untrusted.linkname)!r}, "
                        "which is not a file of this archive"
                    )
                os.link(dest / untrusted.linkname, path, follow_symlinks=False)
            else:
                kind = {
                    tarfile.CHRTYPE: "a character device",
                    tarfile.BLKTYPE: "a block device",
                    tarfile.FIFOTYPE: "a FIFO",
                }.get(untrusted.type, f"of type {untrusted.type!r}")
                raise UnsafeMember(
                    f"member {shown(name)!r} is {kind}: only files, folders and links are restored"
                )
    for path, mtime in reversed(folder_times):
        _set_mtime(path, mtime)
    return len(seen)


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


def _remove(path: Path) -> None:
    """Remove what an operation made or left, subvolumes included; a failure is only logged
    (the next operation or `qnix gc` tries again)."""
    try:
        btrfs.remove_tree(path)
    except (OSError, QnixError) as exc:
        log.warning("cannot remove %s: %s", path, _message(exc))


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
            _fsync_dir(self.folder.parent)
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
            _remove(path)
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
            _fsync_dir(self.folder)
            self._point_latest(work, final.name)
        finally:
            _remove(work)
            _remove(Path(f"{work}{BTRFS_SUFFIX}"))
        taken = _parse(final)
        assert taken is not None
        self.prune(keep)
        return taken

    def _point_latest(self, work: Path, target: str) -> None:
        link = work / LATEST
        os.symlink(target, link)
        os.replace(link, self.folder / LATEST)
        _fsync_dir(self.folder)

    def prune(self, keep: int) -> list[Snapshot]:
        """Remove all but the latest `keep` snapshots (and the one `latest` names); 0 keeps all."""
        if keep <= 0:
            return []
        latest = self.latest()
        found = self.snapshots()
        kept = {s.id for s in found[-keep:]} | ({latest.id} if latest else set())
        removed = [s for s in found if s.id not in kept]
        for snapshot in removed:
            _remove(snapshot.path)
        if removed:
            _fsync_dir(self.folder)
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
            _remove(work)

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


# ---- a compartment's state -----------------------------------------------------------------------


def store_of(paths: RuntimePaths, name: str) -> SnapshotStore:
    try:
        return SnapshotStore(paths.state_dir(name) / SNAPSHOT_DIR)
    except PathError as exc:
        raise QnixError(str(exc)) from exc


def recipients_of(identity: Path) -> tuple[str, ...]:
    """The public keys of the host identity: what snapshots are encrypted to."""
    keygen = require_tool("age-keygen", "age")
    result = run([keygen, "-y", str(identity)], timeout=30)
    found = tuple(line.strip() for line in result.stdout.splitlines() if line.strip())
    if not found:
        raise QnixError(f"{identity} holds no age identity")
    return found


def _host_key(identity: str | Path | None) -> Path:
    from qnix.runtime.secrets import require_identity

    return require_identity(identity)


def _persistent(ws: Workstation, name: str) -> Compartment:
    from qnix.runtime import lifecycle

    compartment = lifecycle._compartment(ws, name)
    if compartment.persistence != "persistent":
        raise QnixError(f"{name} is disposable: it keeps no state to snapshot")
    return compartment


def _require_stopped(paths: RuntimePaths, name: str, hint: str) -> None:
    """Refuse (with `hint`) while `name` runs or starts. The caller holds the lock."""
    from qnix.runtime import lifecycle
    from qnix.runtime.quickrun import running_state

    lifecycle._await_started(paths, name)
    if running_state(paths, name) is not None:
        raise QnixError(f"{name} is running", hint=hint)


def _take(
    paths: RuntimePaths, name: str, keep: int, reason: str, identity: str | Path | None
) -> Snapshot:
    home = paths.home(name)
    if not home.is_dir():
        raise QnixError(f"{name} has no state folder {home}", hint="qnix apply makes it")
    # A btrfs snapshot is not encrypted by qnix: it needs no host key.
    recipients = () if btrfs.is_subvolume(home) else recipients_of(_host_key(identity))
    taken = store_of(paths, name).take(home, recipients, reason, keep)
    events.record(
        paths,
        "snapshot",
        compartment=name,
        reason=reason,
        snapshot=taken.id,
        **taken.recorded(),
        result="ok",
    )
    return taken


def _record_failure(paths: RuntimePaths, event: str, name: str, exc: BaseException) -> None:
    try:
        events.record(paths, event, compartment=name, result=f"error: {_message(exc)}")
    except Exception as failure:
        log.warning("%s: cannot record the %s event: %s", name, event, _message(failure))


def snapshot(
    paths: RuntimePaths, name: str, *, identity: str | Path | None = None, force: bool = False
) -> Snapshot:
    """Snapshot a stopped compartment's state now (a running one with `force`)."""
    from qnix.runtime import lifecycle
    from qnix.runtime.net import require_root

    require_root()
    with lifecycle.locked(paths):
        compartment = _persistent(lifecycle._require_live(paths), name)
        if not force:
            _require_stopped(
                paths,
                name,
                f"its files may be half-written: qnix stop {name} (which takes a snapshot), "
                "or --force to take it as it is",
            )
        try:
            return _take(paths, name, compartment.snapshots, "manual", identity)
        except Exception as exc:
            _record_failure(paths, "snapshot", name, exc)
            raise


def snapshot_after_stop(paths: RuntimePaths, name: str) -> Snapshot | None:
    """The snapshot taken when a persistent compartment has stopped. Never raises: the stop
    is done either way; a failure is an audit event and a warning. The caller holds the lock."""
    from qnix.runtime import lifecycle

    try:
        if not paths.home(name).is_dir():
            return None  # a disposable (or state removed): nothing to keep, no spec to parse
        ws = lifecycle.live_workstation(paths)
        compartment = ws.compartments.get(name) if ws is not None else None
        if compartment is None or compartment.persistence != "persistent":
            return None
        if compartment.snapshots == 0:
            return None
        return _take(paths, name, compartment.snapshots, "stop", None)
    except Exception as exc:
        log.warning("%s: stopped, but its state could not be snapshotted: %s", name, _message(exc))
        _record_failure(paths, "snapshot", name, exc)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Restored:
    restored: Snapshot
    previous: Snapshot | None  # the state before, kept as a snapshot
    entries: int


def restore(
    paths: RuntimePaths,
    name: str,
    snapshot_id: int | None = None,
    *,
    identity: str | Path | None = None,
) -> Restored:
    """Make a stopped compartment's state snapshot `snapshot_id` (the latest by default);
    the state it had is kept as a snapshot first."""
    from qnix.runtime import lifecycle
    from qnix.runtime.net import require_root

    require_root()
    with lifecycle.locked(paths):
        ws = lifecycle._require_live(paths)
        compartment = _persistent(ws, name)
        _require_stopped(paths, name, f"qnix stop {name} first: a restore swaps its whole home")
        store = store_of(paths, name)
        chosen = store.find(snapshot_id, name)
        host = lifecycle.host_identity(ws, name)
        try:
            done = _restore(paths, name, store, chosen, identity, (host.uid, host.gid))
        except Exception as exc:
            _record_failure(paths, "restore", name, exc)
            raise
        store.prune(compartment.snapshots)
        events.record(
            paths,
            "restore",
            compartment=name,
            snapshot=chosen.id,
            previous=done.previous.id if done.previous else None,
            result="ok",
        )
        return done


def _remove_restores(state_dir: Path) -> list[str]:
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(state_dir)):
            if entry.startswith(RESTORE_PREFIX):
                _remove(state_dir / entry)
                removed.append(entry)
    return removed


def _restore(
    paths: RuntimePaths,
    name: str,
    store: SnapshotStore,
    chosen: Snapshot,
    identity: str | Path | None,
    owner: tuple[int, int],
) -> Restored:
    state_dir = paths.state_dir(name)
    home = paths.home(name)
    _remove_restores(state_dir)
    workspace = Path(tempfile.mkdtemp(dir=state_dir, prefix=RESTORE_PREFIX))
    staging = workspace / "home"
    try:
        if chosen.kind == "btrfs":
            btrfs.snapshot(chosen.path, staging, readonly=False)
            entries = _own_tree(staging, owner)
        else:
            if btrfs.on_btrfs(state_dir):
                btrfs.create(staging)  # so that later snapshots are btrfs snapshots
            else:
                staging.mkdir()
            entries = store.unpack(chosen, _host_key(identity), staging, owner)
        os.chown(staging, *owner)
        staging.chmod(0o700)
        _syncfs(staging)
        previous = None
        if home.is_dir():
            subvolume = btrfs.is_subvolume(home)
            recipients = () if subvolume else recipients_of(_host_key(identity))
            previous = store.take(home, recipients, "pre-restore", keep=0)
            _exchange(staging, home)
        else:
            os.rename(staging, home)
        _fsync_dir(state_dir)
    finally:
        _remove(workspace)  # after the swap: the state before
    return Restored(chosen, previous, entries)


def _own_tree(folder: Path, owner: tuple[int, int]) -> int:
    """Give everything under `folder` to `owner` (a snapshot made under another host uid); the
    number of entries. Nothing is followed."""
    entries = 0
    for found in _walk(folder):
        entries += 1
        if (found.info.st_uid, found.info.st_gid) != owner:
            os.chown(folder / found.name, *owner, follow_symlinks=False)
    return entries


def diff(
    paths: RuntimePaths,
    name: str,
    first: int | None = None,
    second: int | None = None,
    *,
    identity: str | Path | None = None,
) -> Diff:
    """From snapshot `first` (the latest by default) to snapshot `second`, or to the live
    folder when `second` is None."""
    from qnix.runtime import lifecycle
    from qnix.runtime.net import require_root

    require_root()
    with lifecycle.locked(paths):
        store = store_of(paths, name)

        def manifest(snapshot: Snapshot) -> dict[str, Entry]:
            key = _host_key(identity) if snapshot.kind == "age" else None
            return store.manifest(snapshot, key)

        before = manifest(store.find(first, name))
        if second is None:
            home = paths.home(name)
            if not home.is_dir():
                raise QnixError(f"{name} has no state folder {home}")
            after = tree_manifest(home)
        else:
            after = manifest(store.find(second, name))
    return compare(before, after)


@dataclasses.dataclass(frozen=True, slots=True)
class Listed:
    id: int
    time: str
    reason: str
    kind: str  # age or btrfs
    size: int | None  # of an age snapshot's ciphertext
    sha256: str | None  # of an age snapshot's ciphertext
    uuid: str | None  # of a btrfs snapshot
    latest: bool
    kept: bool  # within the spec's retention; False: the next snapshot removes it

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def listing(paths: RuntimePaths, name: str) -> list[Listed]:
    """Snapshots of `name`, oldest first, with the hash of each ciphertext (the UUID of each
    btrfs snapshot)."""
    from qnix.runtime import lifecycle
    from qnix.runtime.net import require_root

    require_root()  # the snapshots folder is root's alone
    store = store_of(paths, name)
    ws = lifecycle.live_workstation(paths)
    compartment = ws.compartments.get(name) if ws is not None else None
    keep = compartment.snapshots if compartment is not None else 0
    found = store.snapshots()
    latest = store.latest()
    kept = {s.id for s in found[-keep:]} if keep > 0 else {s.id for s in found}
    rows = []
    for snapshot in found:
        try:
            fingerprint = snapshot.fingerprint()
        except (FileNotFoundError, QnixError):
            continue  # removed meanwhile
        is_latest = latest is not None and latest.id == snapshot.id
        age = snapshot.kind == "age"
        rows.append(
            Listed(
                snapshot.id,
                snapshot.time,
                snapshot.reason,
                snapshot.kind,
                snapshot.size,
                fingerprint if age else None,
                None if age else fingerprint,
                is_latest,
                snapshot.id in kept or is_latest,
            )
        )
    return rows


def remove_leftovers(paths: RuntimePaths) -> list[str]:
    """What interrupted snapshots and restores left, removed (`qnix gc`, under the lock)."""
    changes = []
    try:
        names = sorted(os.listdir(paths.compartments_state))
    except FileNotFoundError:
        return []
    for name in names:
        if not is_name(name):
            continue
        for entry in _remove_restores(paths.state_dir(name)):
            changes.append(f"{name}: removed an unfinished restore ({entry})")
        for entry in store_of(paths, name).remove_temporaries():
            changes.append(f"{name}: removed an unfinished snapshot ({entry})")
    return changes
