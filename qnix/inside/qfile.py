"""Files between compartments, as Qubes' qfile-agent and qfile-unpacker do it.

Runs inside compartments as a lone file (`python3 -I -S /opt/qnix-agent/qfile.py ...`), so it
imports the standard library only. The host pipes one compartment's `pack` into another's
`unpack`; the bytes never pass through the host's Python.

  pack [--single-file] PATH...   (in the source, as its user) the stream, on stdout
  unpack [LIMITS] SOURCE         (in the target, as its user) the stream from stdin lands in
                                 ~/QubesIncoming/SOURCE/; a JSON summary on stdout
  remove PATH...                 (in the source, after a move) the packed paths
  digest PATH                    sha256 and size of one regular file, as JSON
  replace --expect-sha256 H PATH (open-in-disposable edits) one file from stdin replaces PATH
                                 atomically, if PATH still has the content it was sent with

The stream: the magic line `QNIXFILE1\\n`, then entries, each a header (type, name length,
mode, mtime in ns, size: `>cHIqQ`), the name (a relative path, `/` between components, UTF-8)
and `size` bytes of data (a file's content, a symlink's target, nothing for a folder). Types:
`F` regular file, `D` folder (before anything inside it), `L` symlink, `E` end; after `E` the
stream must end. Nothing else is sent: no devices, fifos or sockets (pack refuses them).

What `unpack` guarantees, whatever the stream holds (everything in it is untrusted):

* It writes only below ~/QubesIncoming/SOURCE/: everything is created relative to folder
  descriptors opened with O_NOFOLLOW|O_DIRECTORY, files with O_CREAT|O_EXCL|O_NOFOLLOW, so no
  symlink (sent, or planted by the target's own user) is ever followed while writing.
* Every name component is checked and a bad one REFUSES the whole transfer (nothing is
  renamed to be made safe): empty, `.`, `..`, a NUL or `/` inside, invalid UTF-8, control and
  format characters (newline, bidi overrides, zero-width, ...), unassigned, private-use and
  surrogate code points, more than 255 bytes; a whole path of more than 4095 bytes.
* A symlink is kept only if its target is relative, made of `..` steps first (at most as many
  as the link is deep below the incoming folder) and then plain valid components: it can
  only point inside the incoming folder. Any other symlink refuses the transfer.
* Caps on depth, number of entries and total file bytes (see Limits), and on inactivity.
* The transfer is built in a staging folder (`.qnix-partial-*`, locked while in use) beside
  the incoming entries; each file is written under a temporary name and linked to its own
  name when complete. Only when the whole stream has arrived and checked are the top-level
  entries renamed into place, each without replacing anything that exists (renameat2
  RENAME_NOREPLACE). On any failure the staging folder, and any entry already renamed, are
  removed: a refused transfer leaves nothing. A staging folder left by a killed unpack is
  removed by the next one.
* Modes keep their permission bits only (no setuid, setgid or sticky); a folder always keeps
  rwx for its owner, so the user can manage what arrived. Modification times are kept.
  Data is not fsynced: a crash can lose a completed transfer, never expose a partial one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import stat
import struct
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"QNIXFILE1\n"
HEADER = struct.Struct(">cHIqQ")  # type, name length, mode, mtime_ns, size
FILE, FOLDER, LINK, END = b"F", b"D", b"L", b"E"

INCOMING = "QubesIncoming"
STAGING_PREFIX = ".qnix-partial-"
TEMP_PREFIX = ".qnix-tmp-"
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4095
SOURCE_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Unicode categories a file name must not hold: control, format (bidi overrides, zero-width),
# surrogate, private use, unassigned, line and paragraph separators.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_ENTRIES = 65536
DEFAULT_MAX_BYTES = 8 << 30
DEFAULT_IDLE_TIMEOUT = 120.0
# The summary names this many entries with size and sha256; the counts cover all of them.
SUMMARY_ITEMS = 256
CHUNK = 1 << 20
RENAME_NOREPLACE = 1

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class QfileError(Exception):
    """A refusal: the message says why; the transfer is undone."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = DEFAULT_MAX_DEPTH
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


# ---- names ---------------------------------------------------------------------------------


def shown(untrusted: bytes | str, limit: int = 80) -> str:
    """An untrusted name for a message: printable ASCII kept, everything else escaped."""
    text = untrusted if isinstance(untrusted, str) else untrusted.decode("utf-8", "replace")
    escaped = "".join(
        c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode() for c in text
    )
    return escaped[:limit] + ("..." if len(escaped) > limit else "")


def component_problem(name: str) -> str:
    """What is wrong with one path component ("" if nothing)."""
    if name in ("", ".", ".."):
        return f"the name {name!r} is not allowed"
    if "/" in name:
        return "a name holds a '/'"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        return f"a name is longer than {MAX_COMPONENT_BYTES} bytes"
    for char in name:
        if unicodedata.category(char) in REFUSED_CATEGORIES:
            return f"a name holds the character U+{ord(char):04X}"
    return ""


def decode_name(untrusted_raw: bytes) -> str:
    try:
        return untrusted_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise QfileError(f"a name is not valid UTF-8: {shown(untrusted_raw)}") from None


def check_path(untrusted_raw: bytes) -> tuple[str, ...]:
    """The components of a relative path from the stream; QfileError if any is bad."""
    if not untrusted_raw or len(untrusted_raw) > MAX_PATH_BYTES:
        raise QfileError(f"a path is empty or longer than {MAX_PATH_BYTES} bytes")
    text = decode_name(untrusted_raw)
    components = tuple(text.split("/"))
    for component in components:
        problem = component_problem(component)
        if problem:
            raise QfileError(f"refused {shown(text)}: {problem}")
    return components


def check_link_target(untrusted_raw: bytes, depth: int) -> str:
    """A symlink target that stays inside the incoming folder from a link `depth` folders
    below it: `..` steps only at the start, at most `depth` of them, then plain names."""
    if not untrusted_raw or len(untrusted_raw) > MAX_PATH_BYTES:
        raise QfileError("a symlink target is empty or too long")
    text = decode_name(untrusted_raw)
    parts = text.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if text.startswith("/"):
        raise QfileError(f"refused symlink to {shown(text)}: an absolute target")
    if ups > depth:
        raise QfileError(f"refused symlink to {shown(text)}: it leaves the incoming folder")
    for component in rest:
        problem = component_problem(component)
        if problem:
            raise QfileError(f"refused symlink to {shown(text)}: {problem}")
    return text


def check_source(untrusted: str) -> str:
    if not SOURCE_RE.fullmatch(untrusted):
        raise QfileError(f"{shown(untrusted)} is not a compartment name")
    return untrusted


# ---- writing and reading the stream ----------------------------------------------------------


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _header(kind: bytes, name: bytes, mode: int, mtime_ns: int, size: int) -> bytes:
    return HEADER.pack(kind, len(name), mode & 0o7777, mtime_ns, size) + name


class Packer:
    """Writes entries to `out_fd`; `add` a path at a time, then `finish`."""

    def __init__(self, out_fd: int, *, single_file: bool = False) -> None:
        self.out_fd = out_fd
        self.single_file = single_file
        self.sendfile_works = True
        write_all(out_fd, MAGIC)

    def add(self, path: str) -> None:
        name = os.path.basename(os.path.normpath(path))
        problem = component_problem(name)
        if problem:
            raise QfileError(f"cannot send {shown(path)}: {problem}")
        info = os.lstat(path)
        if self.single_file and not stat.S_ISREG(info.st_mode):
            raise QfileError(f"{shown(path)} is not a regular file")
        self._send(path, name, info, 1)

    def _send(self, path: str, relative: str, info: os.stat_result, depth: int) -> None:
        name = relative.encode("utf-8", "surrogateescape")
        if stat.S_ISREG(info.st_mode):
            self._send_file(path, name, info)
        elif stat.S_ISDIR(info.st_mode):
            write_all(self.out_fd, _header(FOLDER, name, info.st_mode, info.st_mtime_ns, 0))
            with os.scandir(path) as entries:
                children = sorted(entries, key=lambda entry: entry.name)
            for child in children:
                problem = component_problem(child.name)
                if problem:
                    raise QfileError(f"cannot send {shown(child.path)}: {problem}")
                self._send(child.path, f"{relative}/{child.name}", os.lstat(child.path), depth + 1)
        elif stat.S_ISLNK(info.st_mode):
            target = os.fsencode(os.readlink(path))
            write_all(
                self.out_fd,
                _header(LINK, name, 0o777, info.st_mtime_ns, len(target)) + target,
            )
        else:
            kind = "a fifo" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
            raise QfileError(f"cannot send {shown(path)}: {kind}; only files, folders, symlinks")

    def _send_file(self, path: str, name: bytes, info: os.stat_result) -> None:
        # O_NONBLOCK: a fifo swapped in after lstat must not hang us; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or opened.st_ino != info.st_ino:
                raise QfileError(f"{shown(path)} changed while being sent")
            size = opened.st_size
            header = _header(FILE, name, opened.st_mode, opened.st_mtime_ns, size)
            write_all(self.out_fd, header)
            self._copy(fd, size, path)
        finally:
            os.close(fd)

    def _copy(self, fd: int, size: int, path: str) -> None:
        offset = 0
        while offset < size:
            count = min(size - offset, 1 << 30)
            if self.sendfile_works:
                try:
                    sent = os.sendfile(self.out_fd, fd, offset, count)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                        raise
                    self.sendfile_works = False
                    continue
            else:
                chunk = os.pread(fd, min(count, CHUNK), offset)
                write_all(self.out_fd, chunk)
                sent = len(chunk)
            if sent == 0:
                raise QfileError(f"{shown(path)} shrank while being sent")
            offset += sent

    def finish(self) -> None:
        write_all(self.out_fd, HEADER.pack(END, 0, 0, 0, 0))


def pack(paths: Sequence[str], out_fd: int, *, single_file: bool = False) -> None:
    if not paths:
        raise QfileError("nothing to send")
    if single_file and len(paths) != 1:
        raise QfileError("--single-file sends exactly one file")
    packer = Packer(out_fd, single_file=single_file)
    for path in paths:
        packer.add(path)
    packer.finish()


class Stream:
    """Exact reads from the untrusted stream, with an inactivity limit."""

    def __init__(self, fd: int, idle_timeout: float) -> None:
        self.fd = fd
        self.idle_timeout = idle_timeout

    def _wait(self) -> None:
        if not select.select([self.fd], [], [], self.idle_timeout)[0]:
            raise QfileError(f"no data for {self.idle_timeout:g} s: giving up")

    def read_some(self, limit: int) -> bytes:
        self._wait()
        return os.read(self.fd, limit)

    def read_exact(self, size: int) -> bytes:
        chunks = []
        while size:
            data = self.read_some(min(size, CHUNK))
            if not data:
                raise QfileError("the stream ended early (truncated)")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def copy_to(self, out_fd: int, size: int, digest: Any) -> None:
        buffer = bytearray(min(size, CHUNK) or 1)
        view = memoryview(buffer)
        while size:
            self._wait()
            got = os.readv(self.fd, [view[: min(size, len(buffer))]])
            if not got:
                raise QfileError("the stream ended early (truncated)")
            digest.update(view[:got])
            write_all(out_fd, view[:got])
            size -= got

    def expect_end(self) -> None:
        if self.read_some(1):
            raise QfileError("data after the end of the stream")


@dataclass(frozen=True, slots=True)
class Entry:
    kind: bytes
    components: tuple[str, ...]
    mode: int
    mtime_ns: int
    size: int


def read_entry(stream: Stream, limits: Limits) -> Entry | None:
    """The next entry's header and name (None at the end); its data is still to be read."""
    kind, name_length, mode, mtime_ns, size = HEADER.unpack(stream.read_exact(HEADER.size))
    if kind == END:
        if name_length or mode or mtime_ns or size:
            raise QfileError("a malformed end entry")
        stream.expect_end()
        return None
    if kind not in (FILE, FOLDER, LINK):
        raise QfileError(
            f"refused an entry of type {shown(kind)}: devices, fifos, ... are not sent"
        )
    if name_length > MAX_PATH_BYTES:
        raise QfileError(f"a path is longer than {MAX_PATH_BYTES} bytes")
    components = check_path(stream.read_exact(name_length))
    if len(components) > limits.max_depth:
        raise QfileError(f"refused {shown('/'.join(components))}: deeper than {limits.max_depth}")
    if kind == FOLDER and size:
        raise QfileError("a folder entry with data")
    if kind == LINK and size > MAX_PATH_BYTES:
        raise QfileError("a symlink target is too long")
    return Entry(kind, components, mode, mtime_ns, size)


# ---- unpacking -----------------------------------------------------------------------------


def _libc_renameat2() -> Callable[..., int] | None:
    with contextlib.suppress(OSError, AttributeError):
        function: Callable[..., int] = ctypes.CDLL(None, use_errno=True).renameat2
        return function
    return None


def rename_noreplace(old_dir: int, old: str, new_dir: int, new: str) -> None:
    """Rename without ever replacing what is at the new name (FileExistsError instead)."""
    renameat2 = _libc_renameat2()
    if renameat2 is None:
        # An old C library: check, then rename; only the target's own user could race it.
        with contextlib.suppress(FileNotFoundError):
            os.lstat(new, dir_fd=new_dir)
            raise FileExistsError(errno.EEXIST, "exists", new)
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return
    result = renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), RENAME_NOREPLACE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def open_folder(parent_fd: int, name: str, *, create: bool, mode: int = 0o700) -> int:
    """A folder below `parent_fd` opened without following a symlink (made if `create`)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent_fd)
    try:
        return os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        raise QfileError(f"{shown(name)} is not a folder of its own: {exc.strerror}") from None


def _remove_stale_staging(incoming_fd: int) -> None:
    """Staging folders of unpacks that were killed: those nobody holds the lock of."""
    for name in os.listdir(incoming_fd):
        if not name.startswith(STAGING_PREFIX):
            continue
        try:
            fd = os.open(name, O_DIR, dir_fd=incoming_fd)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # in use by a transfer running now
        try:
            shutil.rmtree(name, dir_fd=incoming_fd)
        finally:
            os.close(fd)


@dataclass
class Unpacker:
    """One transfer into `incoming_fd` (the ~/QubesIncoming/SOURCE folder)."""

    incoming_fd: int
    limits: Limits
    where: str = INCOMING  # the incoming folder, for messages
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    staging_fd: int = -1
    top: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    folders: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"entries": 0, "files": 0, "folders": 0, "symlinks": 0}
    )
    total_bytes: int = 0
    _parent: tuple[tuple[str, ...], int] | None = None

    @property
    def staging_name(self) -> str:
        return STAGING_PREFIX + self.token

    def run(self, stream: Stream) -> dict[str, Any]:
        _remove_stale_staging(self.incoming_fd)
        os.mkdir(self.staging_name, 0o700, dir_fd=self.incoming_fd)
        try:
            self.staging_fd = os.open(self.staging_name, O_DIR, dir_fd=self.incoming_fd)
            fcntl.flock(self.staging_fd, fcntl.LOCK_EX)
            if stream.read_exact(len(MAGIC)) != MAGIC:
                raise QfileError("not a qfile stream")
            while (entry := read_entry(stream, self.limits)) is not None:
                self._entry(stream, entry)
            if not self.top:
                raise QfileError("the stream holds no entries")
            self._set_folder_times()
            self._commit()
        except BaseException:
            self._undo()
            raise
        finally:
            self._close()
        with contextlib.suppress(OSError):  # empty now; if not, the next unpack removes it
            os.rmdir(self.staging_name, dir_fd=self.incoming_fd)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "ok": True,
            **self.counts,
            "bytes": self.total_bytes,
            "top": self.top[:SUMMARY_ITEMS],
            "items": self.items[:SUMMARY_ITEMS],
            "items_omitted": max(0, len(self.items) - SUMMARY_ITEMS),
        }

    def _parent_fd(self, components: tuple[str, ...]) -> int:
        """The folder an entry goes into, walked from the staging root without following
        any symlink: only folders this transfer made can be on the way."""
        if not components:
            return self.staging_fd
        if self._parent is not None and self._parent[0] == components:
            return self._parent[1]
        fd = self.staging_fd
        try:
            for name in components:
                try:
                    next_fd = os.open(name, O_DIR, dir_fd=fd)
                except OSError as exc:
                    raise QfileError(
                        f"refused {shown('/'.join(components))}: {shown(name)} is not a folder "
                        f"sent before it ({exc.strerror})"
                    ) from None
                if fd != self.staging_fd:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self.staging_fd:
                os.close(fd)
            raise
        if self._parent is not None:
            os.close(self._parent[1])
        self._parent = (components, fd)
        return fd

    def _entry(self, stream: Stream, entry: Entry) -> None:
        self.counts["entries"] += 1
        if self.counts["entries"] > self.limits.max_entries:
            raise QfileError(f"more than {self.limits.max_entries} entries")
        *parents, name = entry.components
        relative = "/".join(entry.components)
        if name.startswith((STAGING_PREFIX, TEMP_PREFIX)):
            # qnix's own working names, at any depth: what arrives is never mistaken for them.
            raise QfileError(f"refused {shown(name)}: a name reserved for qnix's own files")
        if not parents:
            if name in self.top:
                raise QfileError(f"refused {shown(name)}: a repeated name")
            try:
                os.lstat(name, dir_fd=self.incoming_fd)
            except FileNotFoundError:
                pass
            else:
                raise QfileError(
                    f"{shown(name)} is already in {self.where}; move it away and send again"
                )
            self.top.append(name)
        parent = self._parent_fd(tuple(parents))
        try:
            if entry.kind == FOLDER:
                self._folder(parent, name, entry)
            elif entry.kind == FILE:
                self._file(stream, parent, name, entry, relative)
            else:
                self._link(stream, parent, name, entry, relative)
        except FileExistsError:
            raise QfileError(f"refused {shown(relative)}: sent twice") from None

    def _folder(self, parent: int, name: str, entry: Entry) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, O_DIR, dir_fd=parent)
        try:
            os.fchmod(fd, (entry.mode & 0o777) | 0o700)
        finally:
            os.close(fd)
        self.folders.append((entry.components, entry.mtime_ns))
        self.counts["folders"] += 1

    def _file(self, stream: Stream, parent: int, name: str, entry: Entry, relative: str) -> None:
        self.total_bytes += entry.size
        if self.total_bytes > self.limits.max_bytes:
            raise QfileError(f"more than {self.limits.max_bytes} bytes in all")
        temporary = f"{TEMP_PREFIX}{self.token}-{self.counts['entries']}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600, dir_fd=parent)
        digest = hashlib.sha256()
        try:
            stream.copy_to(fd, entry.size, digest)
            os.fchmod(fd, entry.mode & 0o777)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        os.link(temporary, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        os.unlink(temporary, dir_fd=parent)
        self.counts["files"] += 1
        self.items.append(
            {"name": relative, "type": "file", "size": entry.size, "sha256": digest.hexdigest()}
        )

    def _link(self, stream: Stream, parent: int, name: str, entry: Entry, relative: str) -> None:
        target = check_link_target(stream.read_exact(entry.size), len(entry.components) - 1)
        os.symlink(target, name, dir_fd=parent)
        with contextlib.suppress(OSError):
            os.utime(
                name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False
            )
        self.counts["symlinks"] += 1
        self.items.append({"name": relative, "type": "symlink", "target": target})

    def _set_folder_times(self) -> None:
        # Deepest first: setting a folder's time is undone by writing into it afterwards.
        for components, mtime_ns in sorted(self.folders, key=lambda f: -len(f[0])):
            *parents, name = components
            fd = os.open(name, O_DIR, dir_fd=self._parent_fd(tuple(parents)))
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)

    def _commit(self) -> None:
        for name in self.top:
            try:
                rename_noreplace(self.staging_fd, name, self.incoming_fd, name)
            except FileExistsError:
                raise QfileError(
                    f"{shown(name)} appeared in {self.where} meanwhile; nothing was written"
                ) from None
            self.committed.append(name)

    def _undo(self) -> None:
        """Remove everything this transfer wrote: entries already committed, the staging."""
        for name in self.committed:
            with contextlib.suppress(OSError):
                os.rename(name, name, src_dir_fd=self.incoming_fd, dst_dir_fd=self.staging_fd)
        self.committed.clear()
        self._close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.staging_name, dir_fd=self.incoming_fd)

    def _close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        if self.staging_fd >= 0:
            os.close(self.staging_fd)
            self.staging_fd = -1


def open_incoming(home_fd: int, source: str) -> int:
    """~/QubesIncoming/SOURCE as a descriptor; neither folder may be a symlink."""
    base = open_folder(home_fd, INCOMING, create=True)
    try:
        return open_folder(base, check_source(source), create=True)
    finally:
        os.close(base)


def unpack(home_fd: int, source: str, in_fd: int, limits: Limits = Limits()) -> dict[str, Any]:
    """Receive the stream on `in_fd` into HOME/QubesIncoming/SOURCE; the summary."""
    incoming_fd = open_incoming(home_fd, source)
    try:
        unpacker = Unpacker(incoming_fd, limits, where=f"~/{INCOMING}/{source}")
        return unpacker.run(Stream(in_fd, limits.idle_timeout))
    finally:
        os.close(incoming_fd)


# ---- move, digest, replace -------------------------------------------------------------------


def remove(paths: Iterable[str]) -> int:
    """Remove what a move sent (folders with everything in them; symlinks, not their targets)."""
    count = 0
    for path in paths:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        count += 1
    return count


def _hash_fd(fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def digest(path: str) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QfileError(f"{shown(path)} is not a regular file")
        sha256, size = _hash_fd(fd)
    finally:
        os.close(fd)
    return {"sha256": sha256, "size": size}


def replace(
    path: str, expected_sha256: str, in_fd: int, limits: Limits = Limits()
) -> dict[str, Any]:
    """One file from the stream replaces `path` atomically, if `path` is still a regular file
    with the content `expected_sha256` (else someone changed it meanwhile: refuse)."""
    if not SHA256_RE.fullmatch(expected_sha256):
        raise QfileError("--expect-sha256 takes 64 lower-case hex digits")
    folder, name = os.path.split(os.path.normpath(path))
    folder_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temporary = f"{TEMP_PREFIX}edit-{secrets.token_hex(8)}"
    written = False
    try:
        current = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
        try:
            info = os.fstat(current)
            if not stat.S_ISREG(info.st_mode):
                raise QfileError(f"{shown(path)} is no longer a regular file")
            if _hash_fd(current)[0] != expected_sha256:
                raise QfileError(f"{shown(path)} changed since it was sent; edits not applied")
        finally:
            os.close(current)
        stream = Stream(in_fd, limits.idle_timeout)
        if stream.read_exact(len(MAGIC)) != MAGIC:
            raise QfileError("not a qfile stream")
        entry = read_entry(stream, Limits(1, 1, limits.max_bytes, limits.idle_timeout))
        if entry is None or entry.kind != FILE:
            raise QfileError("the edited stream must hold exactly one regular file")
        if entry.size > limits.max_bytes:
            raise QfileError(f"the edited file is larger than {limits.max_bytes} bytes")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600, dir_fd=folder_fd)
        written = True
        hashed = hashlib.sha256()
        try:
            stream.copy_to(fd, entry.size, hashed)
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & 0o777)
            os.fsync(fd)
        finally:
            os.close(fd)
        if read_entry(stream, limits) is not None:
            raise QfileError("the edited stream must hold exactly one regular file")
        os.rename(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        written = False
        return {"sha256": hashed.hexdigest(), "size": entry.size}
    finally:
        if written:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder_fd)
        os.close(folder_fd)


# ---- command line ----------------------------------------------------------------------------


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.max_depth, args.max_entries, args.max_bytes, args.idle_timeout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfile", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("--single-file", action="store_true")
    packing.add_argument("paths", nargs="+")
    for name in ("unpack", "replace"):
        sub = commands.add_parser(name)
        sub.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH)
        sub.add_argument("--max-entries", type=int, default=DEFAULT_MAX_ENTRIES)
        sub.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
        sub.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
        if name == "unpack":
            sub.add_argument("source")
        else:
            sub.add_argument("--expect-sha256", required=True)
            sub.add_argument("path")
    commands.add_parser("remove").add_argument("paths", nargs="+")
    commands.add_parser("digest").add_argument("path")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.paths, 1, single_file=args.single_file)
            return 0
        if args.command == "unpack":
            home_fd = os.open(os.path.expanduser("~"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                result = unpack(home_fd, args.source, 0, _limits(args))
            finally:
                os.close(home_fd)
        elif args.command == "replace":
            result = replace(args.path, args.expect_sha256, 0, _limits(args))
        elif args.command == "remove":
            result = {"removed": remove(args.paths)}
        else:
            result = digest(args.path)
    except QfileError as exc:
        sys.stderr.write(f"qfile: {exc}\n")
        return 1
    except OSError as exc:
        where = f": {shown(exc.filename)}" if isinstance(exc.filename, str | bytes) else ""
        sys.stderr.write(f"qfile: {exc.strerror or exc}{where}\n")
        return 1
    write_all(1, (json.dumps(result, ensure_ascii=True) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
