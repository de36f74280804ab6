"""Whether the state root is encrypted at rest: the verdict on lsblk's device stacks, and the
real findmnt, lsblk and losetup on file systems this module mounts (a tmpfs, and ext4 images
on loop devices)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.runtime import storage
from qnix.runtime.storage import Verdict
from tests.conftest import need
from tests.runtime.livehost import LiveHost


def dev(name: str, kind: str, *below: dict[str, Any]) -> dict[str, Any]:
    """One device as `lsblk --json --inverse --paths --output NAME,TYPE` shows it: its
    children are what it stands on."""
    return {"name": name, "type": kind, **({"children": list(below)} if below else {})}


def loop_on(image_verdict: Verdict) -> dict[str, Any]:
    return dev(f"/dev/loop-on-{image_verdict}", "loop")


def image_verdict(loop: str) -> Verdict:
    verdict = loop.removeprefix("/dev/loop-on-")
    assert verdict in ("encrypted", "memory", "plain", "unknown")
    return verdict  # type: ignore[return-value]


DISK = dev("/dev/sda", "disk")
PART = dev("/dev/sda2", "part", DISK)
LUKS = dev("/dev/mapper/luks-1", "crypt", PART)
OTHER_LUKS = dev("/dev/mapper/luks-2", "crypt", DISK)
CASES: list[tuple[str, dict[str, Any], Verdict]] = [
    ("a whole disk", DISK, "plain"),
    ("a partition", PART, "plain"),
    ("LUKS on a partition", LUKS, "encrypted"),
    ("LVM on LUKS", dev("/dev/mapper/vg-root", "lvm", LUKS), "encrypted"),
    ("LVM on a plain partition", dev("/dev/mapper/vg-h", "lvm", PART), "plain"),
    ("RAID 1 of two LUKS", dev("/dev/md0", "raid1", LUKS, OTHER_LUKS), "encrypted"),
    ("RAID 1 of LUKS and a plain partition", dev("/dev/md1", "raid1", LUKS, PART), "plain"),
    ("LUKS on RAID", dev("/dev/mapper/c", "crypt", dev("/dev/md2", "raid1", PART)), "encrypted"),
    ("a loop device on an encrypted disk", loop_on("encrypted"), "encrypted"),
    ("a loop device on a plain disk", loop_on("plain"), "plain"),
    ("a loop device whose image is in memory", loop_on("memory"), "memory"),
    ("LVM on loops in memory", dev("/dev/vg/r", "lvm", loop_on("memory")), "memory"),
    ("LVM on LUKS and memory", dev("/dev/vg/s", "lvm", LUKS, loop_on("memory")), "encrypted"),
    ("LVM on a loop of unknown storage", dev("/dev/vg/l", "lvm", loop_on("unknown")), "unknown"),
    ("LVM on plain and unknown", dev("/dev/vg/m", "lvm", PART, loop_on("unknown")), "unknown"),
]


@pytest.mark.parametrize(("stack", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_device_is_encrypted_only_on_dm_crypt_all_the_way_down(
    stack: dict[str, Any], verdict: Verdict
) -> None:
    assert storage.device_verdict(stack, image_verdict) == verdict


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points to unmount (last first) when the test ends; loop devices go with them."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for point in reversed(made):
            subprocess.run([need("umount"), str(point)], check=True)


def mount_tmpfs(where: Path, mounts: list[Path]) -> Path:
    where.mkdir()
    subprocess.run(
        [need("mount"), "-t", "tmpfs", "-o", "size=64m", "qnixtest", str(where)], check=True
    )
    mounts.append(where)
    return where


def mount_image(
    image: Path, where: Path, mounts: list[Path], fstype: str = "ext4", size_mb: int = 16
) -> Path:
    with image.open("wb") as handle:
        handle.truncate(size_mb << 20)
    subprocess.run([need(f"mkfs.{fstype}"), "-q", str(image)], check=True)
    where.mkdir()
    subprocess.run([need("mount"), "-o", "loop", str(image), str(where)], check=True)
    mounts.append(where)
    return where


def test_the_real_tools_follow_a_loop_device_to_its_image(
    tmp_path: Path, mounts: list[Path]
) -> None:
    memory = mount_tmpfs(tmp_path / "memory", mounts)
    assert storage.at_rest(memory) == storage.AtRest(memory, "qnixtest", "tmpfs", "memory")
    # ext4 on a loop device whose image is in that tmpfs: in memory too, found through losetup.
    on_loop = mount_image(memory / "fs.img", tmp_path / "on-loop", mounts)
    (on_loop / "deeper").mkdir()
    found = storage.at_rest(on_loop / "deeper")
    assert (found.source.startswith("/dev/loop"), found.fstype, found.verdict) == (
        True,
        "ext4",
        "memory",
    )
    # Its image gone: nothing says where the data lies.
    (memory / "fs.img").unlink()
    assert storage.at_rest(on_loop).verdict == "unknown"
    # An image on this test's own disk: as that disk is.
    on_disk = mount_image(tmp_path / "disk.img", tmp_path / "on-disk", mounts)
    assert storage.at_rest(on_disk).verdict == storage.at_rest(tmp_path).verdict


def test_on_btrfs_the_warning_names_the_snapshots_too(tmp_path: Path, mounts: list[Path]) -> None:
    root = mount_image(tmp_path / "fs.img", tmp_path / "state", mounts, "btrfs", size_mb=128)
    (tmp_path / "fs.img").unlink()  # storage qnix cannot tell about: it warns
    warning = storage.state_root_warning(root)
    assert warning is not None and "homes and their btrfs snapshots are plaintext" in warning
    assert "(btrfs), and qnix cannot tell" in warning


SPEC = """\
[host]
hostname = "lab"
subnet = "10.218.0.0/16"

[compartments.work]
memory_mb = 128
"""


@pytest.mark.parametrize("where", ["tmpfs", "unknown image"])
def test_apply_says_when_persistent_homes_are_not_encrypted_at_rest(where: str) -> None:
    host = LiveHost()
    mounted: list[Path] = []
    try:
        if where == "tmpfs":
            mount_tmpfs(host.paths.state_root, mounted)
        else:
            mount_image(host.base / "state.img", host.paths.state_root, mounted)
            (host.base / "state.img").unlink()
        said = host.qnix("apply", str(host.spec(SPEC)))
        assert said.returncode == 0, said.stderr
        if where == "tmpfs":
            assert said.stderr == ""  # nothing of it is at rest
        else:
            assert re.fullmatch(
                f"warning: the state root {re.escape(str(host.paths.state_root))} is on "
                r"/dev/loop\d+ \(ext4\), and qnix cannot tell whether that is encrypted: the "
                r"persistent compartments' homes are plaintext at rest \(their snapshots are "
                r"age-encrypted\); keep the state root on an encrypted disk \(LUKS; on NixOS "
                r"boot.initrd.luks.devices\)\n",
                said.stderr,
            ), said.stderr
    finally:
        host.mounts += mounted
        host.close()
