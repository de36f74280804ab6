"""What the install tests share: a listing of the places install writes, and the `qnix` of
this checkout."""

from __future__ import annotations

import stat
import sys
from collections.abc import Mapping
from pathlib import Path

QNIX = Path(sys.executable).with_name("qnix")

# Every place `make install` / `qnix install` writes, and how deep to list it: /opt and /var/lib
# hold other software's files (one level shows whether qnix's folder is there).
PLACES = {
    "/opt": 1,
    "/usr/local/bin": 1,
    "/etc/systemd/system": 9,
    "/etc/tmpfiles.d": 1,
    "/etc/rsyslog.d": 1,
    "/etc/qnix": 9,
    "/run/qnix": 9,
    "/var/lib": 1,
}
STATE_ROOT = "/var/lib/qnix"


def listing(root: Path, places: Mapping[str, int] = PLACES, *, skip: str = STATE_ROOT) -> list[str]:
    """Each path in the places down to their depth, with its type and mode (and a link's
    target), sorted; `skip` is left out with everything under it."""
    lines: list[str] = []

    def visit(path: Path, depth: int) -> None:
        name = "/" + str(path.relative_to(root))
        if name == skip or name.startswith(skip + "/"):
            return
        info = path.lstat()
        target = f" -> {path.readlink()}" if path.is_symlink() else ""
        lines.append(f"{stat.filemode(info.st_mode)} {name}{target}")
        if depth and path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                visit(child, depth - 1)

    for place, depth in places.items():
        top = root / place.lstrip("/")
        if top.exists() or top.is_symlink():
            visit(top, depth)
    return sorted(lines)
