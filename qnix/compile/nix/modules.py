"""One NixOS module per concern, as value trees (see `tree`), and the smaller concerns themselves.

`module_trees` is what the flake is rendered from; tests walk the same trees to check every
option path against the NixOS and microvm.nix option references.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from qnix.compile.aide import aide_config
from qnix.compile.desktop import (
    desktop_string,
    entry_name,
    exec_line,
    gui_compartments,
    hyprland_rules,
    hyprland_rules_name,
    launchers,
    sway_fragment,
    sway_fragment_name,
)
from qnix.compile.names import CONTAINER_RANGE_SIZE, HOST_ID_BASE, unix_user
from qnix.compile.nix.compartments import (
    SECRETS_RUNTIME_DIR,
    STATE_ROOT,
    compartments_module,
    container_ranges,
    host_uids,
    state_dir,
)
from qnix.compile.nix.disk import disk_module
from qnix.compile.nix.hardening import hardening_module
from qnix.compile.nix.printer import Call, NixValue, Raw, attr_path, string
from qnix.compile.nix.vms import vms_module
from qnix.compile.overlay import tailscale_containers
from qnix.compile.rsyslog import AUDIT_LOG, receiver_config, rsyslog_config
from qnix.spec.model import NETWORK_NONE, RECEIVED_DIR, Compartment, Workstation

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

NFT_TABLE = "qnix"
NETWORK_KERNEL_MODULES = ("veth",)
# A system user's login shell: none.
NOLOGIN = Raw('"${pkgs.shadow}/bin/nologin"')
# Where the label colours' window rules go (below /etc).
SWAY_ETC = f"sway/config.d/{sway_fragment_name()}"
HYPRLAND_ETC = f"qnix/{hyprland_rules_name()}"


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
    tailscale = tailscale_containers(ws)
    if tailscale:  # each in its container: never on the host's own network
        config["containers"] = tailscale
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
    uids = host_uids(ws)
    for compartment in ws.compartments.values():
        name = unix_user(compartment.name)
        # The uid the qnix runtime runs the compartment as, or the host side of the user
        # inside a container, so its state agrees.
        uid = uids[compartment.name]
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


# ---- audit: auditd rules, an osquery pack, AIDE and its timer --------------------------------

# Where the qnix runtime keeps its live generation and the table it loaded on a NixOS host
# (qnix.runtime.paths defaults).
RUN_ROOT = "/run/qnix"
GENERATION_DIR = f"{RUN_ROOT}/generation"
NFT_TRANSACTION_FILE = f"{RUN_ROOT}/qnix.nft"
# /etc/aide.conf is where NixOS's AIDE looks by default; its database lives beside systemd's
# state directory of the check unit.
AIDE_ETC = "aide.conf"
AIDE_DATABASE_DIR = "/var/lib/aide"
AIDE_UNIT = "qnix-aide-check"
OSQUERY_PACK = "qnix"
# Setuid programs: NixOS puts real (copied) files for them in /run/wrappers/bin.
AUDITED_WRAPPERS = ("sudo", "su", "mount", "umount")
# Other privileged programs run from the Nix store (/run/current-system/sw/bin only links
# there), and the kernel records the file an exec reached, not the links on the way: a rule
# must name the store path, so it is written as Nix code. (package attribute, program)
AUDITED_PROGRAMS = (
    ("util-linux", "mount"),
    ("util-linux", "umount"),
    ("nftables", "nft"),
    ("iproute2", "ip"),
    ("bubblewrap", "bwrap"),
    ("systemd", "systemd-nspawn"),
)
AUDIT_KEY_PRIVILEGED = "qnix-privileged"
# The osquery pack's queries; what follows WHERE is numbers and paths qnix computes.
_PROCESSES = "SELECT pid, parent, uid, gid, name, path, cmdline FROM processes"
_LISTENING = (
    "SELECT p.uid, l.pid, p.name, l.protocol, l.family, l.address, l.port, l.net_namespace"
    " FROM listening_ports AS l JOIN processes AS p USING (pid)"
)
_HASH = "SELECT path, sha256 FROM hash"
_MODULE_SYSCALLS = "init_module,finit_module,delete_module"


def _audit_arches(ws: Workstation) -> tuple[str, ...]:
    """The system call tables a process can use: x86_64 also runs 32-bit (i386) programs."""
    return ("b64", "b32") if ws.host.system == "x86_64-linux" else ("b64",)


def audit_rules(ws: Workstation) -> list[NixValue]:
    """auditctl rules: writes to /etc and to qnix's state, kernel modules loaded or removed,
    every execution of the privileged programs, and any program run as root on behalf of a
    logged-in user (so a copy of nft or qnix elsewhere is seen too)."""
    rules: list[NixValue] = ["-w /etc -p wa -k qnix-etc", f"-w {STATE_ROOT} -p wa -k qnix-state"]
    for arch in _audit_arches(ws):
        rules.append(f"-a always,exit -F arch={arch} -S {_MODULE_SYSCALLS} -k qnix-modules")
    rules += [
        f"-a always,exit -F path=/run/wrappers/bin/{name} -F perm=x -k {AUDIT_KEY_PRIVILEGED}"
        for name in AUDITED_WRAPPERS
    ]
    rules += [
        Raw(
            f'"-a always,exit -F path=${{pkgs.{package}}}/bin/{program} -F perm=x'
            f' -k {AUDIT_KEY_PRIVILEGED}"'
        )
        for package, program in AUDITED_PROGRAMS
    ]
    for arch in _audit_arches(ws):
        rules.append(
            f"-a always,exit -F arch={arch} -S execve,execveat -F euid=0 -F auid>=1000"
            " -F auid!=unset -k qnix-root-exec"
        )
    return rules


def compartment_uid_ranges(ws: Workstation) -> list[tuple[int, int]]:
    """The host uids (first, last) any compartment or disposable of `ws` can run as:
    HOST_ID_BASE plus a link slot of the subnet (slot 0 is the network's own address), and
    the range of each NixOS container's user namespace."""
    slots = ipaddress.IPv4Network(ws.host.subnet).num_addresses // 2
    ranges = [(HOST_ID_BASE + 1, HOST_ID_BASE + slots - 1)]
    for first in sorted(container_ranges(ws).values()):
        ranges.append((first, first + CONTAINER_RANGE_SIZE - 1))
    return ranges


def osquery_pack(ws: Workstation) -> dict[str, NixValue]:
    """Scheduled osquery queries about the compartments. Only numbers qnix computes enter
    the SQL. osquery has no nftables table: the pack hashes the ruleset file the runtime
    loaded (`qnix drift` compares the live table) and lists legacy iptables rules, which
    would filter beside nftables."""

    def in_compartment(column: str) -> str:
        either = " OR ".join(
            f"{column} BETWEEN {low} AND {high}" for low, high in compartment_uid_ranges(ws)
        )
        return f"({either})"

    queries: dict[str, NixValue] = {
        "qnix_compartment_processes": {
            "description": "Processes running as a compartment's host uid.",
            "interval": 300,
            "query": f"{_PROCESSES} WHERE {in_compartment('uid')};",
        },
        "qnix_compartment_listening_ports": {
            "description": "Sockets a compartment's processes listen on.",
            "interval": 300,
            "query": f"{_LISTENING} WHERE {in_compartment('p.uid')};",
        },
        "qnix_kernel_modules": {
            "description": "Kernel modules loaded (a new row is a module loaded).",
            "interval": 600,
            "query": "SELECT name, size, used_by, status FROM kernel_modules;",
        },
        "qnix_iptables_rules": {
            "description": "Legacy iptables rules, which would filter beside qnix's nftables.",
            "interval": 600,
            "query": "SELECT filter_name, chain, policy, target, protocol, src_ip, dst_ip,"
            " iniface, outiface FROM iptables;",
        },
        "qnix_nft_ruleset_file": {
            "description": "The nftables transaction the qnix runtime last loaded.",
            "interval": 600,
            "query": f"{_HASH} WHERE path = '{NFT_TRANSACTION_FILE}';",
        },
    }
    return {"platform": "linux", "queries": queries}


def _aide_units() -> dict[str, NixValue]:
    """A daily `aide --check` against the baseline; differences fail the unit (AIDE's exit
    code), so they show in `systemctl --failed` and the journal holds the report."""
    return {
        "services": {
            AIDE_UNIT: {
                "documentation": ["man:aide(1)", "man:aide.conf(5)"],
                "path": [attr_path("pkgs", "aide")],
                "script": f"aide --config=/etc/{AIDE_ETC} --check",
                "serviceConfig": {
                    "IOSchedulingClass": "idle",
                    "Nice": 19,
                    "StateDirectory": AIDE_DATABASE_DIR.removeprefix("/var/lib/"),
                    "StateDirectoryMode": "0700",
                    "Type": "oneshot",
                },
            }
        },
        "timers": {
            AIDE_UNIT: {
                "documentation": ["man:aide(1)"],
                "timerConfig": {
                    "OnCalendar": "daily",
                    "Persistent": True,
                    "RandomizedDelaySec": "1h",
                },
                "wantedBy": ["timers.target"],
            }
        },
    }


def audit_module(ws: Workstation) -> dict[str, NixValue]:
    # "lock": the rules cannot be changed until the next boot.
    enable: NixValue = "lock" if ws.host.hardening == "paranoid" else True
    aide_conf = aide_config(
        ws, database_dir=AIDE_DATABASE_DIR, generation_dir=GENERATION_DIR, state_root=STATE_ROOT
    )
    services: dict[str, NixValue] = {
        "osquery": {
            "enable": True,
            # auditd owns the kernel's audit socket; osquery only runs the scheduled pack.
            "flags": {"disable_audit": "true", "disable_events": "true"},
            "settings": {"packs": {OSQUERY_PACK: osquery_pack(ws)}},
        }
    }
    receive = ws.audit.receive
    configs = [rsyslog_config(ws, AUDIT_LOG)]
    if receive is not None:
        configs.append(receiver_config(receive, RECEIVED_DIR))
    if any(configs):
        services["rsyslogd"] = {"enable": True, "extraConfig": "\n".join(filter(None, configs))}
    systemd = _aide_units()
    extra: dict[str, NixValue] = {}
    if receive is not None:
        # The folder exists from boot on, so that the unit that makes the received copies
        # append-only (qnix's own module) runs; the port is open to the senders.
        systemd["tmpfiles"] = {"rules": [f"d {RECEIVED_DIR} 0700 root root -"]}
        extra["networking"] = {"firewall": {"allowedTCPPorts": [receive.port]}}
    return {
        **extra,
        "environment": {
            # Copied (not linked to the store) and root-only: it lists what is watched.
            "etc": {AIDE_ETC: {"mode": "0600", "text": aide_conf}},
            "systemPackages": [attr_path("pkgs", "aide")],
        },
        "security": {
            "audit": {"enable": enable, "rules": audit_rules(ws)},
            "auditd": {"enable": True},
        },
        "services": services,
        "systemd": systemd,
    }


# Where the build keeps the age ciphertexts, beside flake.nix (and the runtime in its live
# generation).
SECRETS_DIR = "secrets"
# The host's age identity: the NixOS services get it as a systemd credential; the qnix runtime
# reads the same file unless told otherwise (qnix.runtime.secrets.DEFAULT_IDENTITY).
HOST_IDENTITY = "/etc/qnix/host.agekey"
_IDENTITY_CREDENTIAL = "qnix-host.agekey"
# What a unit name or a systemd command line may hold unquoted; the spec's compartment and
# secret names only ever have these.
_SYSTEMD_SAFE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_COMPARTMENT_UNITS = {"container": "container@{}.service", "vm": "microvm@{}.service"}


def secret_file(name: str) -> str:
    """Where an age secret's ciphertext sits in the build, relative to flake.nix."""
    return f"{SECRETS_DIR}/{name}.age"


def _interpolated(*parts: str | Raw) -> Raw:
    """A Nix string of text (escaped by the printer) and `${...}` of code qnix writes."""
    return Raw(
        '"'
        + "".join(string(p)[1:-1] if isinstance(p, str) else "${" + p.code + "}" for p in parts)
        + '"'
    )


def _secrets_service(ws: Workstation, compartment: Compartment) -> dict[str, NixValue]:
    """A oneshot unit, bound to the compartment's own, that decrypts its age secrets into a
    folder of its own in /run (a tmpfs) before it starts, as the compartment's user, and
    removes them when it stops (RuntimeDirectory goes with the unit)."""
    names = [n for n in compartment.secrets if ws.secrets[n].source == "age"]
    for name in (compartment.name, *names):
        if not _SYSTEMD_SAFE.fullmatch(name):
            raise ValueError(f"not a name for a systemd unit or command line: {name!r}")
    unit = _COMPARTMENT_UNITS[compartment.isolation].format(compartment.name)
    folder = f"{SECRETS_RUNTIME_DIR}/{compartment.name}"
    user = unix_user(compartment.name)
    decrypt = [
        _interpolated(
            attr_path("pkgs", "age"),
            f"/bin/age --decrypt --identity %d/{_IDENTITY_CREDENTIAL} --output {folder}/{name} ",
            # The ciphertext, copied into the store from the build: never a plaintext.
            Raw(f"../{secret_file(name)}"),
        )
        for name in names
    ]
    # A VM's folder is shared by its virtiofsd, which must not start before the folder exists.
    share = (
        [f"microvm-virtiofsd@{compartment.name}.service"] if compartment.isolation == "vm" else []
    )
    return {
        "before": [unit, *share],
        "partOf": [unit],
        "requiredBy": [unit, *share],
        "serviceConfig": {
            "ExecStart": decrypt,
            "Group": user,
            # systemd hands the root-only key to this unit alone, readable by its user.
            "LoadCredential": f"{_IDENTITY_CREDENTIAL}:{HOST_IDENTITY}",
            "RemainAfterExit": True,
            "RuntimeDirectory": folder.removeprefix("/run/"),
            "RuntimeDirectoryMode": "0700",
            "Type": "oneshot",
            "UMask": "0277",  # every secret file 0400
            "User": user,
        },
        "unitConfig": {
            "Description": f"qnix: the secrets of compartment {compartment.name}, in {folder}"
        },
    }


def secrets_module(ws: Workstation) -> dict[str, NixValue]:
    """age on the host, and for each container or VM listing age secrets a unit that decrypts
    them at its start. A namespace compartment gets its secrets from the qnix runtime when it
    starts; a pass secret never reaches a container or VM (the loader refuses it)."""
    if not any(secret.source == "age" for secret in ws.secrets.values()):
        return {}
    services = {
        f"qnix-secrets-{c.name}": _secrets_service(ws, c)
        for c in ws.compartments.values()
        if c.isolation in _COMPARTMENT_UNITS
        and any(ws.secrets[n].source == "age" for n in c.secrets)
    }
    config: dict[str, NixValue] = {"environment": {"systemPackages": [attr_path("pkgs", "age")]}}
    if services:
        config["systemd"] = {"services": services}
    return config


def desktop_items(ws: Workstation) -> list[dict[str, str]]:
    """One menu entry per app of each compartment and disposable template, Qubes-style:
    `[work] firefox`, `[dvm] firefox`. makeDesktopItem writes its values as they are, so each
    is escaped as the Desktop Entry spec asks first."""
    return [
        {
            "desktopName": desktop_string(f"[{owner}] {app}"),
            "exec": exec_line(argv),
            "name": entry_name(owner, app),
        }
        for owner, app, argv in launchers(ws)
    ]


def desktop_module(ws: Workstation) -> dict[str, NixValue]:
    config: dict[str, NixValue] = {}
    environment: dict[str, NixValue] = {}
    items = desktop_items(ws)
    if items:
        environment["systemPackages"] = [
            Call(attr_path("pkgs", "makeDesktopItem"), item) for item in items
        ]
    if gui_compartments(ws):
        # The label colours as window rules: sway's default config includes
        # /etc/sway/config.d/*; a Hyprland config sources the rules file (docs/gui.md).
        environment["etc"] = {
            SWAY_ETC: {"text": sway_fragment(ws)},
            HYPRLAND_ETC: {"text": hyprland_rules(ws)},
        }
    if environment:
        config["environment"] = environment
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
