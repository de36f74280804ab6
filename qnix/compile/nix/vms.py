"""VM compartments (`isolation = "vm"`) as declarative microvm.nix VMs on QEMU.

The VM's tap device on the host is `names.host_ifname(name)`, the same name a veth would have, so
the `inet qnix` table judges a VM's traffic exactly like any other compartment's. Its MAC address
is derived from the name (locally administered, unicast), and the guest configures its end of the
/31 by that MAC with systemd-networkd. A persistent VM keeps its home and persistent paths on the
host, shared over virtiofs from the same state directories a container would use; the user in
the guest has the compartment's host uid, the owner of those directories. A VM listing
age secrets gets the folder the secrets unit decrypts them into as a read-only virtiofs share at
/run/secrets (virtiofsd `--readonly`).
"""

from __future__ import annotations

import hashlib

from qnix.compile.names import Link, host_id, host_ifname
from qnix.compile.nix.compartments import (
    SECRETS_INSIDE,
    links,
    package_list,
    persistent_mounts,
    secrets_mount,
)
from qnix.compile.nix.printer import Function, NixValue
from qnix.spec.model import NETWORK_NONE, Compartment, Workstation

HYPERVISOR = "qemu"
# Loaded at boot: with security.lockKernelModules nothing can be loaded later.
VM_KERNEL_MODULES = ("tun", "vhost_net")


def mac_address(name: str) -> str:
    """A stable, locally administered unicast MAC for a compartment's interface."""
    digest = hashlib.sha256(b"qnix-mac\x00" + name.encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))


def share_tag(mount_point: str) -> str:
    """A virtiofs tag (short, fixed alphabet) for a mount point."""
    return "qx" + hashlib.sha256(mount_point.encode()).hexdigest()[:12]


def vms(ws: Workstation) -> list[Compartment]:
    return [c for c in ws.compartments.values() if c.isolation == "vm"]


def _guest(ws: Workstation, compartment: Compartment, link: Link) -> dict[str, NixValue]:
    networked = compartment.network != NETWORK_NONE
    mac = mac_address(compartment.name)
    interfaces: list[NixValue] = (
        [{"id": host_ifname(compartment.name), "mac": mac, "type": "tap"}] if networked else []
    )
    shares: list[NixValue] = [
        {
            "mountPoint": mount_point,
            "proto": "virtiofs",
            "source": source,
            "tag": share_tag(mount_point),
        }
        for mount_point, source in persistent_mounts(compartment).items()
    ]
    secrets = secrets_mount(ws, compartment)
    if secrets is not None:
        shares.append(
            {
                "mountPoint": SECRETS_INSIDE,
                "proto": "virtiofs",
                "readOnly": True,
                "source": secrets,
                "tag": share_tag(SECRETS_INSIDE),
            }
        )
    guest: dict[str, NixValue] = {
        "environment": {"systemPackages": package_list(compartment)},
        "microvm": {
            "hypervisor": HYPERVISOR,
            "interfaces": interfaces,
            "mem": compartment.memory_mb,
            "shares": shares,
            "vcpu": compartment.cpus,
        },
    }
    if networked:
        guest["networking"] = {"useNetworkd": True}
        guest["systemd"] = {
            "network": {
                "networks": {
                    "10-qnix": {
                        "address": [f"{link.address}/{link.prefix}"],
                        "gateway": [link.gateway],
                        "matchConfig": {"MACAddress": mac},
                    }
                }
            }
        }
    guest["system"] = {"stateVersion": ws.host.state_version}
    # A guest's uids are its own: the user inside has the host uid that owns the shared state
    # and secrets (virtiofsd passes owners through unchanged), so they are the user's own.
    owner = host_id(link, ws.host.subnet)
    guest["users"] = {"users": {compartment.user: {"isNormalUser": True, "uid": owner}}}
    return guest


def vms_module(ws: Workstation) -> dict[str, NixValue]:
    machines = vms(ws)
    if not machines:
        return {}
    all_links = links(ws)
    return {
        "boot": {"kernelModules": list(VM_KERNEL_MODULES)},
        "microvm": {
            "host": {"enable": True},
            "vms": {
                c.name: {
                    "autostart": c.autostart,
                    "config": Function(("pkgs",), _guest(ws, c, all_links[c.name])),
                }
                for c in machines
            },
        },
    }
