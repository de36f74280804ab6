"""The disk (disko) and the boot chain.

GPT with a 1 GiB EFI system partition, an optional swap partition, and the rest as LUKS2
(`cryptroot`) holding the chosen file system; `encryption = "none"` puts the file system on the
partition directly. Swap next to an encrypted root gets a fresh random key at every boot, so it
never holds anything readable after power-off. TPM2 unlock uses systemd in the initrd; the key is
enrolled once by hand (`systemd-cryptenroll --tpm2-device=auto`). Secure Boot is lanzaboote,
which replaces systemd-boot.
"""

from __future__ import annotations

from qnix.compile.nix.compartments import STATE_ROOT
from qnix.compile.nix.printer import Call, NixValue, Raw
from qnix.spec.model import Filesystem, Workstation

LUKS_NAME = "cryptroot"
ESP_SIZE = "1G"
SECURE_BOOT_PKI = "/var/lib/sbctl"
BTRFS_MOUNT_OPTIONS = ("compress=zstd", "noatime")
# Subvolume -> mount point: the state root on its own, so it can be snapshotted alone.
BTRFS_SUBVOLUMES = {
    "@home": "/home",
    "@nix": "/nix",
    "@root": "/",
    "@var-lib-qnix": STATE_ROOT,
}


def filesystem_content(filesystem: Filesystem) -> dict[str, NixValue]:
    if filesystem == "btrfs":
        return {
            "extraArgs": ["-f"],
            "subvolumes": {
                name: {"mountOptions": list(BTRFS_MOUNT_OPTIONS), "mountpoint": mount_point}
                for name, mount_point in BTRFS_SUBVOLUMES.items()
            },
            "type": "btrfs",
        }
    return {"format": filesystem, "mountpoint": "/", "type": "filesystem"}


def disk_module(ws: Workstation) -> dict[str, NixValue]:
    disk = ws.host.disk
    encrypted = disk.encryption == "luks2"
    root: dict[str, NixValue] = filesystem_content(disk.filesystem)
    if encrypted:
        root = {
            "content": root,
            "extraFormatArgs": ["--type", "luks2"],
            "name": LUKS_NAME,
            "settings": {"allowDiscards": True},
            "type": "luks",
        }
    partitions: dict[str, NixValue] = {
        "ESP": {
            "content": {
                "format": "vfat",
                "mountOptions": ["umask=0077"],
                "mountpoint": "/boot",
                "type": "filesystem",
            },
            "size": ESP_SIZE,
            "type": "EF00",
        },
        # disko puts a "100%" partition last, whatever its name.
        "root": {"content": root, "size": "100%"},
    }
    if disk.swap_gb > 0:
        partitions["swap"] = {
            "content": {"randomEncryption": encrypted, "type": "swap"},
            "size": f"{disk.swap_gb}G",
        }

    boot: dict[str, NixValue] = {}
    if encrypted and disk.tpm2:
        boot["initrd"] = {
            "luks": {"devices": {LUKS_NAME: {"crypttabExtraOpts": ["tpm2-device=auto"]}}},
            "systemd": {"enable": True},
        }
    if ws.host.secure_boot:
        boot["lanzaboote"] = {"enable": True, "pkiBundle": SECURE_BOOT_PKI}
    boot["loader"] = {
        "efi": {"canTouchEfiVariables": True},
        "systemd-boot": {
            "enable": Call(Raw("lib.mkForce"), False) if ws.host.secure_boot else True
        },
    }
    if disk.filesystem == "bcachefs":
        boot["supportedFilesystems"] = ["bcachefs"]

    return {
        "boot": boot,
        "disko": {
            "devices": {
                "disk": {
                    "main": {
                        "content": {"partitions": dict(sorted(partitions.items())), "type": "gpt"},
                        "device": disk.device,
                        "type": "disk",
                    }
                }
            }
        },
    }
