"""One NixOS module per concern, as value trees (see `tree`), and the smaller concerns themselves.

`module_trees` is what the flake is rendered from; tests walk the same trees to check every
option path against the NixOS and microvm.nix option references.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from qnix.compile.names import allocate_links, host_id, unix_user
from qnix.compile.nix.compartments import STATE_ROOT, compartments_module, state_dir
from qnix.compile.nix.disk import disk_module
from qnix.compile.nix.hardening import hardening_module
from qnix.compile.nix.printer import Call, NixValue, Raw, attr_path
from qnix.compile.nix.vms import vms_module
from qnix.spec.model import NETWORK_NONE, Workstation

CONCERNS = (
    "compartments",
    "network",
    "users",
    "hardening",
    "audit",
    "secrets",
    "desktop",
    "vms",
    "disk",
)

SECRETS_RUNTIME_DIR = "/run/qnix/secrets"
NFT_TABLE = "qnix"
NETWORK_KERNEL_MODULES = ("veth",)
# A system user's login shell: none.
NOLOGIN = Raw('"${pkgs.shadow}/bin/nologin"')
AUDIT_RULES = (
    "-w /etc -p wa -k qnix-etc",
    f"-w {STATE_ROOT} -p wa -k qnix-state",
    "-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k modules",
)
# Characters a desktop entry's Exec line may hold unquoted (the spec's names only ever have these).
_EXEC_SAFE = re.compile(r"[A-Za-z0-9_.+-]+")


def network_module(ws: Workstation, nft_table_body: str) -> dict[str, NixValue]:
    config: dict[str, NixValue] = {}
    networked = any(c.network != NETWORK_NONE for c in ws.compartments.values()) or any(
        t.network != NETWORK_NONE for t in ws.disposable_templates.values()
    )
    if networked:
        config["boot"] = {
            "kernel": {"sysctl": {"net.ipv4.ip_forward": 1}},
            "kernelModules": list(NETWORK_KERNEL_MODULES),
        }
    config["networking"] = {
        "nftables": {
            "enable": True,
            "tables": {NFT_TABLE: {"content": nft_table_body, "family": "inet"}},
        }
    }
    return config


def users_module(ws: Workstation) -> dict[str, NixValue]:
    users: dict[str, NixValue] = {}
    groups: dict[str, NixValue] = {}
    links = allocate_links(ws.compartments, ws.host.subnet)
    for compartment in ws.compartments.values():
        name = unix_user(compartment.name)
        # The same number the qnix runtime runs the compartment as, so its state agrees.
        uid = host_id(links[compartment.name], ws.host.subnet)
        users[name] = {
            "uid": uid,
            "createHome": False,  # systemd.tmpfiles makes it, mode 0700
            "description": f"qnix compartment {compartment.name}",
            "group": name,
            "home": state_dir(compartment.name),
            "isSystemUser": True,
            "shell": NOLOGIN,
        }
        groups[name] = {"gid": uid}
    if not users:
        return {}
    return {"users": {"groups": groups, "users": users}}


def audit_module(ws: Workstation) -> dict[str, NixValue]:
    # "lock": the rules cannot be changed until the next boot.
    enable: NixValue = "lock" if ws.host.hardening == "paranoid" else True
    return {
        "security": {
            "audit": {"enable": enable, "rules": list(AUDIT_RULES)},
            "auditd": {"enable": True},
        }
    }


def secrets_module(ws: Workstation) -> dict[str, NixValue]:
    """Only the tmpfs directory secrets are decrypted into at run time; never a secret."""
    if not ws.secrets:
        return {}
    return {
        "systemd": {
            "tmpfiles": {
                "rules": [
                    "d /run/qnix 0755 root root -",
                    f"d {SECRETS_RUNTIME_DIR} 0700 root root -",
                ]
            }
        }
    }


def desktop_items(ws: Workstation) -> list[dict[str, str]]:
    """One menu entry per app of each compartment, Qubes-style: `[work] firefox`."""
    items = []
    for compartment in ws.compartments.values():
        for app in compartment.apps:
            if not (_EXEC_SAFE.fullmatch(compartment.name) and _EXEC_SAFE.fullmatch(app)):
                raise ValueError(f"unsafe desktop entry: {compartment.name!r} {app!r}")
            items.append(
                {
                    "desktopName": f"[{compartment.name}] {app}",
                    "exec": f"qnix run {compartment.name} -- {app}",
                    "name": f"qnix-{compartment.name}-{app}",
                }
            )
    return items


def desktop_module(ws: Workstation) -> dict[str, NixValue]:
    config: dict[str, NixValue] = {}
    items = desktop_items(ws)
    if items:
        config["environment"] = {
            "systemPackages": [Call(attr_path("pkgs", "makeDesktopItem"), item) for item in items]
        }
    if ws.host.desktop.hyprland:
        config["programs"] = {"hyprland": {"enable": True}}
    config["services"] = {
        "logind": {"settings": {"Login": {"HandleLidSwitch": ws.host.desktop.lid_switch}}}
    }
    return config


def module_trees(ws: Workstation, nft_table_body: str) -> dict[str, dict[str, NixValue]]:
    """The config of every module, by concern, in `CONCERNS` order."""
    emitters: dict[str, Callable[[Workstation], dict[str, NixValue]]] = {
        "compartments": compartments_module,
        "network": lambda w: network_module(w, nft_table_body),
        "users": users_module,
        "hardening": hardening_module,
        "audit": audit_module,
        "secrets": secrets_module,
        "desktop": desktop_module,
        "vms": vms_module,
        "disk": disk_module,
    }
    return {concern: emitters[concern](ws) for concern in CONCERNS}
