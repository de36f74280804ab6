"""btrfs subvolumes for compartment state (qnix.runtime.state uses them where it can).

Where the state root is on btrfs, `qnix apply` makes a persistent compartment's home a subvolume
of its own. A snapshot of it is then a read-only btrfs snapshot: taken in milliseconds whatever
the home's size, copy-on-write, and one point in time even while the compartment writes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from pathlib import Path

from qnix.errors import QnixError
from qnix.runner import require_tool, run

BTRFS_SUPER_MAGIC = 0x9123683E
# BTRFS_FIRST_FREE_OBJECTID: the inode number of every subvolume's root folder.
SUBVOLUME_ROOT_INODE = 256
TIMEOUT = 600.0


class _Statfs(ctypes.Structure):
    # f_type leads struct statfs on every Linux architecture qnix supports; the rest is room.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _filesystem_type(path: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    found = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(found)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return int(found.f_type) & 0xFFFFFFFF


def on_btrfs(path: Path) -> bool:
    return _filesystem_type(path) == BTRFS_SUPER_MAGIC


def is_subvolume(path: Path) -> bool:
    """`path` itself (not followed) is the root folder of a btrfs subvolume."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_ino == SUBVOLUME_ROOT_INODE and on_btrfs(path)


def _btrfs() -> str:
    return require_tool("btrfs", "btrfs-progs")


def create(path: Path) -> None:
    """A new, empty subvolume at `path` (root's, 0755 like mkdir's default: chmod it after)."""
    run([_btrfs(), "-q", "subvolume", "create", str(path)], timeout=TIMEOUT)


def snapshot(source: Path, dest: Path, *, readonly: bool) -> None:
    """A snapshot of subvolume `source` at `dest` (which must not exist)."""
    flags = ["-r"] if readonly else []
    run([_btrfs(), "-q", "subvolume", "snapshot", *flags, str(source), str(dest)], timeout=TIMEOUT)


def uuid(path: Path) -> str:
    """The subvolume's UUID: what names one snapshot for good (recorded in the audit log)."""
    shown = run([_btrfs(), "subvolume", "show", str(path)], timeout=TIMEOUT).stdout
    for line in shown.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "UUID":
            return value.strip()
    raise QnixError(f"btrfs shows no UUID for {path}")


def delete(path: Path) -> None:
    """Delete subvolume `path` with all it holds (read-only or not)."""
    run([_btrfs(), "-q", "subvolume", "delete", str(path)], timeout=TIMEOUT)


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it, subvolumes included (deepest first: btrfs keeps
    a subvolume that holds another). Nothing is followed; a missing `path` is fine."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
        return
    if not on_btrfs(path):
        shutil.rmtree(path)
        return
    subvolumes = []
    for folder, names, _ in os.walk(path):
        for name in names:
            child = Path(folder) / name
            if os.lstat(child).st_ino == SUBVOLUME_ROOT_INODE:
                subvolumes.append(child)
    if os.lstat(path).st_ino == SUBVOLUME_ROOT_INODE:
        subvolumes.insert(0, path)
    for subvolume in sorted(subvolumes, key=lambda p: -len(p.parts)):
        delete(subvolume)
    if os.path.lexists(path):
        shutil.rmtree(path)
