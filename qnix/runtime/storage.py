"""Whether what qnix keeps under a folder is encrypted at rest.

qnix encrypts what it writes away (secrets, snapshots that are copies), but a persistent
compartment's home is a plain folder while it lives, and a btrfs snapshot shares its blocks. As
in Qubes, at rest they rely on the disk being encrypted. `qnix apply` says so when the state root
is not: its file system (findmnt) is on a block device whose stack (lsblk) has no dm-crypt
layer, or is a loop device (losetup) whose image lies on such a disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qnix.errors import QnixError
from qnix.runner import require_tool, run

Verdict = Literal["encrypted", "memory", "plain", "unknown"]

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})  # nothing of it is at rest
ENCRYPTING_FILESYSTEMS = frozenset({"ecryptfs", "fuse.gocryptfs", "fuse.encfs"})
MAX_DEPTH = 8  # loops on images on loops…: deeper than this, qnix cannot tell
TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class AtRest:
    """Where a folder's data lies and whether it is encrypted there."""

    path: Path
    source: str
    fstype: str
    verdict: Verdict


def device_verdict(
    untrusted_tree: Mapping[str, Any], loop_image_verdict: Callable[[str], Verdict]
) -> Verdict:
    """One device of `lsblk --json --inverse` with what it stands on (its children): encrypted
    when it is a dm-crypt device, or stands only on encrypted devices, or is a loop device whose
    image is on encrypted storage."""
    kind = untrusted_tree.get("type")
    if kind == "crypt":
        return "encrypted"
    if kind == "loop":
        return loop_image_verdict(str(untrusted_tree.get("name")))
    below = untrusted_tree.get("children") or []
    if not below:
        return "plain"  # a disk or a partition of one
    verdicts = {device_verdict(child, loop_image_verdict) for child in below}
    for verdict in ("unknown", "plain"):
        if verdict in verdicts:
            return verdict  # one plain device under a RAID or a volume group is enough
    return "memory" if verdicts == {"memory"} else "encrypted"


def at_rest(path: Path, depth: int = 0) -> AtRest:
    """Where `path` (which exists) lies and whether it is encrypted at rest; "unknown" when
    the tools cannot tell (a network or FUSE file system, ZFS's own encryption…)."""
    try:
        found = run(
            [
                require_tool("findmnt", "util-linux"),
                *("--json", "--nofsroot", "--output", "SOURCE,FSTYPE", "--target", str(path)),
            ],
            timeout=TIMEOUT,
        )
        mount = json.loads(found.stdout)["filesystems"][-1]  # the last: on top of the rest
        source, fstype = str(mount["source"]), str(mount["fstype"])
    except (QnixError, ValueError, KeyError, TypeError, IndexError):
        return AtRest(path, "?", "?", "unknown")
    if fstype in MEMORY_FILESYSTEMS:
        return AtRest(path, source, fstype, "memory")
    if fstype in ENCRYPTING_FILESYSTEMS:
        return AtRest(path, source, fstype, "encrypted")
    if not source.startswith("/dev/") or depth >= MAX_DEPTH:
        return AtRest(path, source, fstype, "unknown")
    try:
        listed = run(
            [
                require_tool("lsblk", "util-linux"),
                *("--json", "--inverse", "--paths", "--output", "NAME,TYPE", source),
            ],
            timeout=TIMEOUT,
        )
        (device,) = json.loads(listed.stdout)["blockdevices"]
        verdict = device_verdict(device, lambda loop: _loop_image_verdict(loop, depth))
    except (QnixError, ValueError, KeyError, TypeError, AttributeError):
        verdict = "unknown"
    return AtRest(path, source, fstype, verdict)


def _loop_image_verdict(loop: str, depth: int) -> Verdict:
    try:
        listed = run(
            [
                require_tool("losetup", "mount"),
                *("--json", "--list", "--output", "NAME,BACK-FILE", loop),
            ],
            timeout=TIMEOUT,
        )
        (device,) = json.loads(listed.stdout)["loopdevices"]
        image = Path(str(device["back-file"]).removesuffix(" (deleted)"))
    except (QnixError, ValueError, KeyError, TypeError):
        return "unknown"
    if not image.is_absolute() or not image.exists():
        return "unknown"
    return at_rest(image, depth + 1).verdict


def state_root_warning(state_root: Path) -> str | None:
    """What `qnix apply` tells of the state root when persistent homes there are not
    encrypted at rest; None when they are (or nothing of them is at rest)."""
    found = at_rest(state_root)
    if found.verdict in ("encrypted", "memory"):
        return None
    kept = (
        "homes and their btrfs snapshots are plaintext at rest"
        if found.fstype == "btrfs"  # snapshots share the home's blocks (qnix.runtime.btrfs)
        else "homes are plaintext at rest (their snapshots are age-encrypted)"
    )
    where = f"{found.source} ({found.fstype})"
    said = (
        f"is on {where}, which is not encrypted"
        if found.verdict == "plain"
        else f"is on {where}, and qnix cannot tell whether that is encrypted"
    )
    return (
        f"the state root {state_root} {said}: the persistent compartments' {kept}; keep the "
        "state root on an encrypted disk (LUKS; on NixOS boot.initrd.luks.devices)"
    )
