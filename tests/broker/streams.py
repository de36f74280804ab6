"""Building qfile streams by hand, hostile ones included, and looking at what a folder holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qnix.inside import qfile


def entry(kind: bytes, name: bytes | str, data: bytes = b"", mode: int = 0o644) -> bytes:
    """One entry; `data` is a file's content or a symlink's target."""
    raw = name.encode() if isinstance(name, str) else name
    return qfile.HEADER.pack(kind, len(raw), mode, 1_700_000_000 * 10**9, len(data)) + raw + data


def lying_entry(kind: bytes, name: bytes | str, size: int, data: bytes = b"") -> bytes:
    """An entry whose header announces `size` bytes whatever follows."""
    raw = name.encode() if isinstance(name, str) else name
    return qfile.HEADER.pack(kind, len(raw), 0o644, 0, size) + raw + data


END = qfile.HEADER.pack(qfile.END, 0, 0, 0, 0)


def stream(*entries: bytes, end: bool = True) -> bytes:
    return qfile.MAGIC + b"".join(entries) + (END if end else b"")


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Everything below `root`: relative path -> (kind, permission bits, content or target)."""
    found: dict[str, tuple[str, int, bytes | str]] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("folder", mode, b"")
            else:
                found[relative] = ("file", mode, path.read_bytes())
    return found
