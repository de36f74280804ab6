"""Copies of other hosts' audit logs, as a log server keeps them: one append-only file each.

The receiver rsyslog that qnix generates (qnix.compile.rsyslog.receiver_config) writes one
file per sending host. `protect(folder)` makes each of them append-only with `chattr +a`
where the file system has the flag (ext4, btrfs, xfs, ...): nothing, root's processes included,
can then change or cut what is already written, only add to it, until someone holding
CAP_LINUX_IMMUTABLE removes the flag. rsyslog appends (O_APPEND), so it keeps writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qnix.errors import QnixError
from qnix.runner import require_tool, run

# What chattr says when the file system has no such flag.
UNSUPPORTED = ("Operation not supported", "Inappropriate ioctl for device")


@dataclass(frozen=True, slots=True)
class Protected:
    """The files made (or already) append-only, and those whose file system cannot."""

    append_only: tuple[Path, ...]
    unsupported: tuple[Path, ...]


def protect(folder: Path) -> Protected:
    chattr = require_tool("chattr", "e2fsprogs")
    done: list[Path] = []
    unsupported: list[Path] = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_file() or path.is_symlink():
            continue
        result = run([chattr, "+a", str(path)], check=False)
        if result.returncode == 0:
            done.append(path)
        elif any(text in result.stderr for text in UNSUPPORTED):
            unsupported.append(path)
        else:
            raise QnixError(
                f"cannot make {path} append-only: {result.stderr.strip()}",
                hint="run as root (chattr +a needs CAP_LINUX_IMMUTABLE)",
            )
    return Protected(tuple(done), tuple(unsupported))
