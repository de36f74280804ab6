"""A folder as a tar stream and back: walked without following links, described by a
manifest of its entries, and unpacked from an untrusted archive so that nothing lands outside
the destination (qnix.runtime.snapshots keeps such streams encrypted; qnix.runtime.state
compares and restores them).

The tree is read through file descriptors opened with O_NOFOLLOW relative to their folder, so
a symlink is stored as a symlink and never followed, even if the compartment swaps a file for
one while it is read. Other file systems mounted inside, FIFOs, sockets and device nodes are
left out. Hard links within the folder stay hard links. Unpacking refuses any member that could
write outside the destination (absolute names, `..`, a path through a link or a file, a hard
link to anything but an earlier file of the archive, device nodes, FIFOs, duplicates), and what
it writes is owned by the given owner, without setuid, setgid or sticky bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

from qnix.errors import QnixError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


log = logging.getLogger("qnix.state")

CHUNK = 1 << 20
PERMISSION_BITS = 0o777  # setuid, setgid and sticky bits are never restored

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


def walk_tree(folder: Path) -> Iterator[_Found]:
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
        for found in walk_tree(folder):
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
    for found in walk_tree(folder):
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
