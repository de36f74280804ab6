"""A container's cgroups: with --keep-unit nspawn puts itself and the container into
`supervisor` and `payload` sub-cgroups of the cgroup it starts in, so a container is launched
into the compartment's cgroup plus `qnix/<name>` in systemd's own hierarchies, and removed with
every sub-cgroup of them."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from qnix.runtime import cgroups


def systemd_hierarchies(mounts: Path = cgroups.MOUNTS) -> tuple[Path, ...]:
    """Where systemd's own controller lives: a cgroup2 mount (the only hierarchy on a v2 host,
    `unified` on a hybrid one) and a v1 name=systemd mount."""
    found: list[Path] = []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        systemd = fields[2] == "cgroup2" or (fields[2] == "cgroup" and "name=systemd" in fields[3])
        if systemd and mountpoint not in found:
            found.append(mountpoint)
    return tuple(found)


def _extra_paths(cgroup: cgroups.Cgroup, mounts: Path) -> tuple[Path, ...]:
    """qnix/<name> in each systemd hierarchy that does not already hold the cgroup."""
    own = {path.parent.parent for path in cgroup.paths}
    return tuple(
        hierarchy / cgroups.QNIX_DIR / cgroup.name
        for hierarchy in systemd_hierarchies(mounts)
        if hierarchy not in own
    )


def placement(cgroup: cgroups.Cgroup, mounts: Path = cgroups.MOUNTS) -> cgroups.Cgroup:
    """The cgroup a container is launched into: the compartment's, plus qnix/<name> in the
    systemd hierarchies (made here), so that nspawn's sub-cgroups land below it."""
    extra = _extra_paths(cgroup, mounts)
    for path in extra:
        path.mkdir(parents=True, exist_ok=True)
    return cgroups.Cgroup(cgroup.name, (*cgroup.paths, *extra))


def cgroup_tree(cgroup: cgroups.Cgroup, mounts: Path = cgroups.MOUNTS) -> cgroups.Cgroup:
    """Every folder of a compartment's cgroups, deepest first: its own, qnix/<name> in the
    systemd hierarchies, and every sub-cgroup of them (nspawn's payload and supervisor).
    cgroups.kill and cgroups.remove over it leave nothing; for a namespace compartment it is
    just its cgroup."""
    tops = [*cgroup.paths, *(p for p in _extra_paths(cgroup, mounts) if p.is_dir())]
    found: list[Path] = []
    for top in tops:
        found += _descendants(top)
        found.append(top)
    return cgroups.Cgroup(cgroup.name, tuple(found))


def _descendants(top: Path) -> list[Path]:
    """Sub-folders of `top`, each before its parent."""
    below: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                below += _descendants(Path(entry.path))
                below.append(Path(entry.path))
    return below
