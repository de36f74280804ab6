"""The qnix services of a host, as one table rendered two ways: unit files (a Debian or other
systemd host, `qnix install`) and the NixOS module's `systemd.*` options (nix/module.nix).

Each unit is hardened as far as its job allows, and no further:

* `qnix-boot` makes network namespaces, veths, nft tables, mounts and cgroups, and starts the
  keepers and the spawner, which stay in its cgroup after its command returns (a oneshot that
  remains active) and whose children are the compartments. So it gets no mount namespace of its
  own (ProtectSystem=, PrivateTmp=, ReadWritePaths=, ProtectKernelModules= and the like would
  make one, and the `/run/netns` bind mounts it makes would then never reach the host), no
  device policy (QEMU needs /dev/kvm and /dev/net/tun), and nothing the compartments inherit
  that their programs need (W^X for JITs, namespaces for bubblewrap, sethostname for its
  `--hostname`). What is left: no new privileges, no set-uid files, native system calls only,
  a few system call groups no compartment or tool needs, the address families the runtime and
  the compartments use, and a capability bounding set without the capabilities of clock, boot,
  module, MAC and audit administration.
* `qnix-gc` does what boot undoes, with the same needs of the host's mount namespace, but
  neither starts nor runs anything: only the capabilities and address families it uses.
* `qnix-integrity` (AIDE against the baseline) and `qnix-host-key` (the host's age identity)
  touch only files: a read-only system, private everything, no network.
* `qnix-pull` (its timer every few minutes, once `qnix pull --init` pinned a fleet repository's
  signers) applies what it pulls, so it has the boot unit's needs and limits, which the
  compartments it starts inherit. Those must outlive the pull, while a oneshot's leftover
  processes are stopped with it: it runs `qnix pull` through `systemd-run --scope`, which
  moves itself into a new transient scope and then becomes `qnix pull`, so every keeper the
  pull starts lives in that scope, which ends with the last of them. The scope is ordered
  before qnix-boot: at shutdown (and only then is it stopped) the boot unit's `qnix down` stops
  every compartment first, the pulls' included, as it stops its own. On a host that is not
  NixOS the pull units are put in place by `qnix pull --install-timer`, not `qnix install`:
  only a desk of a fleet needs them.

The audit log needs no unit: it is a file under the state root, which the tmpfiles rules make.
There is no broker socket to activate: calls from a compartment are served by its keeper, and
`qnix dispose` reaches the spawner over the socket the spawner binds itself (both run in the
boot unit). The pool of preloaded disposables is refilled by `qnix boot`, `qnix apply` and
after each `qnix dispose`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from qnix import __version__
from qnix.compile.aide import DATABASE as AIDE_DATABASE
from qnix.compile.nix.printer import Call, Function, NixValue, Raw, render, string
from qnix.spec.model import RECEIVED_DIR

Host = Literal["nixos", "other"]
HOSTS: tuple[Host, ...] = ("nixos", "other")
# The programs a unit runs, named by the renderer for its host (a store path on NixOS).
Tool = Literal["qnix", "age-keygen", "systemd-run"]
# Which command puts a unit in place on a host that is not NixOS.
Installer = Literal["install", "pull"]

STATE_ROOT = "/var/lib/qnix"
RUN_ROOT = "/run/qnix"
CONFIG_DIR = "/etc/qnix"
# qnix.runtime.secrets.DEFAULT_IDENTITY, qnix.compile.nix.modules.HOST_IDENTITY
HOST_IDENTITY = f"{CONFIG_DIR}/host.agekey"
# qnix.runtime.integrity.INTEGRITY_FOLDER under the state root
INTEGRITY_DIR = f"{STATE_ROOT}/integrity"
AUDIT_DIR = f"{STATE_ROOT}/audit"
# qnix.runtime.pull.PullFiles under the state root
PULL_DIR = f"{STATE_ROOT}/pull"

Value = str | int | bool | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModuleOption:
    """An argument taken from an option of the NixOS module: `FLAG VALUE` when the option is
    set, nothing when it is null. Other hosts have no such option and leave it out."""

    flag: str
    option: str


@dataclass(frozen=True, slots=True)
class Program:
    """An argument that is the path of a program (a command run by another, as systemd-run
    runs qnix)."""

    tool: Tool


Argument = str | ModuleOption | Program
Command = tuple[Tool, tuple[Argument, ...]]

# Capabilities no qnix unit uses: setting the clock, rebooting, loading modules (the kernel
# loads veth and nft modules itself on a netlink request), MAC policy, the audit system's
# configuration, raw I/O, process accounting, the kernel log.
UNUSED_CAPABILITIES = (
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_BLOCK_SUSPEND",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_SYS_BOOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_PACCT",
    "CAP_SYS_RAWIO",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
)

# What every unit keeps: it cannot gain privileges, make set-uid files, switch personality or
# architecture, or take realtime scheduling; what it creates is its own.
COMMON: dict[str, Value] = {
    "LockPersonality": True,
    "NoNewPrivileges": True,
    "RestrictRealtime": True,
    "RestrictSUIDSGID": True,
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}

# The host-facing units (boot, gc): the host's own mount namespace (see the module docstring).
HOST_FACING: dict[str, Value] = {
    **COMMON,
    "CapabilityBoundingSet": ("~" + " ".join(UNUSED_CAPABILITIES),),
    # Compartments inherit this: rebooting, swap, the clock, raw port I/O and old system calls
    # are for none of them (their own seccomp filter refuses more).
    "SystemCallErrorNumber": "EPERM",
    "SystemCallFilter": ("~@clock @cpu-emulation @obsolete @raw-io @reboot @swap",),
}

# What the runtime and the compartments talk: the boot unit's and the pull's.
RUNTIME_FAMILIES = "AF_UNIX AF_NETLINK AF_INET AF_INET6 AF_PACKET AF_VSOCK"

# Units that only read and write files.
FILES_ONLY: dict[str, Value] = {
    **COMMON,
    "IPAddressDeny": "any",
    "MemoryDenyWriteExecute": True,
    "PrivateDevices": True,
    "PrivateNetwork": True,
    "PrivateTmp": True,
    "ProtectClock": True,
    "ProtectControlGroups": True,
    "ProtectHome": "read-only",
    "ProtectHostname": True,
    "ProtectKernelLogs": True,
    "ProtectKernelModules": True,
    "ProtectKernelTunables": True,
    "ProtectSystem": "strict",
    "RestrictAddressFamilies": "AF_UNIX",
    "RestrictNamespaces": True,
    "SystemCallFilter": ("@system-service", "~@privileged"),
}


@dataclass(frozen=True, slots=True)
class Timer:
    description: str
    settings: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class Service:
    """One systemd service (`<name>.service`) and the timer that starts it, if any."""

    name: str
    description: str
    command: Command
    service: Mapping[str, Value]
    stop: Command | None = None
    reload: Command | None = None
    # Units whose reload reloads this one too (ReloadPropagatedFrom=).
    reload_with: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    wants: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    conditions: Mapping[str, str] = field(default_factory=dict)
    wanted_by: tuple[str, ...] = ()
    timer: Timer | None = None
    # Whether `nixos-rebuild switch` restarts the unit when it changed (NixOS's default).
    restart_on_switch: bool = True
    # Where the unit is installed; NixOS's own AIDE unit comes with the generated flake.
    hosts: tuple[Host, ...] = HOSTS
    # On a host that is not NixOS: `qnix install` or `qnix pull --install-timer`.
    installer: Installer = "install"

    @property
    def unit(self) -> str:
        return f"{self.name}.service"


SERVICES: tuple[Service, ...] = (
    Service(
        name="qnix-host-key",
        description="qnix: the host's age identity, made once",
        command=("age-keygen", ("-o", HOST_IDENTITY)),
        conditions={"ConditionPathExists": f"!{HOST_IDENTITY}"},
        after=("systemd-tmpfiles-setup.service",),
        before=("qnix-boot.service",),
        wanted_by=("multi-user.target",),
        service={
            **FILES_ONLY,
            "CapabilityBoundingSet": "",
            "ReadWritePaths": CONFIG_DIR,
            "Type": "oneshot",
            "UMask": "0277",  # the key is 0400
        },
    ),
    Service(
        name="qnix-boot",
        description="qnix: the host brought to the live generation",
        # On NixOS the built flake sets the generation to its own folder: the host comes up
        # from it with nothing applied by hand.
        command=("qnix", ("boot", ModuleOption("--generation", "generation"))),
        stop=("qnix", ("down",)),
        # nftables.service flushes the whole ruleset when it starts or reloads (a NixOS switch
        # that changes the firewall reloads it): qnix's table comes after, and a reload of it
        # makes `qnix gc` put back the table qnix loaded, running disposables' elements and all.
        reload=("qnix", ("gc",)),
        reload_with=("nftables.service",),
        after=(
            "network-pre.target",
            "nftables.service",
            "systemd-tmpfiles-setup.service",
            "qnix-host-key.service",
        ),
        wants=("network-pre.target",),
        wanted_by=("multi-user.target",),
        service={
            **HOST_FACING,
            "RemainAfterExit": True,
            "RestrictAddressFamilies": RUNTIME_FAMILIES,
            "TimeoutStartSec": "5min",
            "Type": "oneshot",
        },
        # Restarting it stops every compartment (`qnix down`): a switch to a new qnix package
        # or a new generation leaves them running, and the next boot (or a restart by hand)
        # brings the host up from the new one. A switch that adds the unit starts it.
        restart_on_switch=False,
    ),
    Service(
        name="qnix-gc",
        description="qnix: remove what a crash left behind",
        command=("qnix", ("gc",)),
        after=("qnix-boot.service",),
        service={
            **HOST_FACING,
            "CapabilityBoundingSet": (
                "CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_KILL CAP_NET_ADMIN"
                " CAP_SYS_ADMIN CAP_SYS_PTRACE",
            ),
            # It talks netlink and files only, touches no device and runs no compartment.
            "DevicePolicy": "closed",
            "IPAddressDeny": "any",
            "MemoryDenyWriteExecute": True,
            "ProtectClock": True,
            "ProtectHostname": True,
            "RestrictAddressFamilies": "AF_UNIX AF_NETLINK",
            "Type": "oneshot",
        },
        timer=Timer(
            description="qnix: remove what a crash left behind, daily",
            settings={"OnBootSec": "15min", "OnUnitActiveSec": "1d"},
        ),
    ),
    Service(
        name="qnix-audit-seal",
        description="qnix: seal the audit log with a forward-secure key",
        command=("qnix", ("audit", "seal")),
        # Until `qnix audit seal --init` showed the verification key there is no key to seal with.
        conditions={"ConditionPathExists": f"{AUDIT_DIR}/events.sealkey"},
        service={
            **FILES_ONLY,
            "CapabilityBoundingSet": "",
            "ReadWritePaths": AUDIT_DIR,
            "Type": "oneshot",
        },
        timer=Timer(
            description="qnix: seal the audit log every 15 minutes",
            settings={"OnBootSec": "1min", "OnUnitActiveSec": "15min"},
        ),
    ),
    Service(
        name="qnix-received-append-only",
        description="qnix: make the received copies of other hosts' audit logs append-only",
        command=("qnix", ("audit", "protect-received", RECEIVED_DIR)),
        # Only on a log server: the folder exists once the receiver has written to it.
        conditions={"ConditionPathIsDirectory": RECEIVED_DIR},
        service={
            **FILES_ONLY,
            "CapabilityBoundingSet": "CAP_LINUX_IMMUTABLE",
            "ReadWritePaths": RECEIVED_DIR,
            "Type": "oneshot",
        },
        timer=Timer(
            description="qnix: make new received audit logs append-only, every minute",
            settings={"OnBootSec": "1min", "OnUnitActiveSec": "1min"},
        ),
    ),
    Service(
        name="qnix-integrity",
        description="qnix: compare the files with the AIDE baseline",
        command=("qnix", ("integrity", "check")),
        # Until `qnix integrity init` recorded a baseline there is nothing to compare with
        # (the folder alone is not enough: `qnix install --spec` puts aide.conf there).
        conditions={"ConditionPathExists": f"{INTEGRITY_DIR}/{AIDE_DATABASE}"},
        service={
            **FILES_ONLY,
            "CapabilityBoundingSet": "CAP_DAC_READ_SEARCH",
            "IOSchedulingClass": "idle",
            "Nice": 19,
            "ReadWritePaths": f"{INTEGRITY_DIR} {AUDIT_DIR}",
            "Type": "oneshot",
        },
        timer=Timer(
            description="qnix: compare the files with the AIDE baseline, daily",
            settings={"OnCalendar": "daily", "Persistent": True, "RandomizedDelaySec": "1h"},
        ),
        hosts=("other",),
    ),
    Service(
        name="qnix-pull",
        description="qnix: follow the fleet repository (qnix pull)",
        # The scope, not this unit, holds what the pull starts (the module docstring).
        command=(
            "systemd-run",
            (
                "--scope",
                "--quiet",
                "--collect",
                "--property=Before=qnix-boot.service",
                Program("qnix"),
                "pull",
            ),
        ),
        # Until `qnix pull --init` pinned the signers this host follows no repository.
        conditions={"ConditionPathExists": f"{PULL_DIR}/trust.json"},
        after=("network-online.target", "qnix-boot.service"),
        wants=("network-online.target",),
        service={
            **HOST_FACING,
            "RestrictAddressFamilies": RUNTIME_FAMILIES,
            # A fetch, an apply and its health check, perhaps a roll-back: a stopped pull is
            # put right by the next one (docs/fleet.md), but should not be cut short often.
            "TimeoutStartSec": "30min",
            "Type": "oneshot",
        },
        timer=Timer(
            description="qnix: follow the fleet repository, every 5 minutes",
            # Spread over a minute, so that a fleet's desks do not fetch at the same second.
            settings={"OnBootSec": "5min", "OnUnitActiveSec": "5min", "RandomizedDelaySec": "1min"},
        ),
        installer="pull",
    ),
)

# The folders the runtime and the units expect, root's alone (tmpfiles.d(5) lines).
TMPFILES_RULES = (
    f"d {CONFIG_DIR} 0700 root root -",
    f"d {STATE_ROOT} 0700 root root -",
    f"d {AUDIT_DIR} 0700 root root -",
    f"d {RUN_ROOT} 0700 root root -",
)
TMPFILES_NAME = "qnix.conf"


def services_for(host: Host, installer: Installer | None = None) -> tuple[Service, ...]:
    """The host's services; on a host that is not NixOS, those one installer puts in place."""
    return tuple(s for s in SERVICES if host in s.hosts and installer in (None, s.installer))


# ---- unit files ------------------------------------------------------------------------------


def _ini_value(value: Value) -> list[str]:
    """One line per item of a tuple (systemd merges repeated settings), else one line."""
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, tuple):
        return list(value)
    return [str(value)]


def _section(name: str, settings: Mapping[str, Value]) -> str:
    lines = [f"[{name}]"]
    for key, value in settings.items():
        lines += [f"{key}={item}" for item in _ini_value(value)]
    return "\n".join(lines) + "\n"


def _exec(tools: Mapping[Tool, str], command: Command) -> str:
    tool, args = command
    words = [tools[a.tool] if isinstance(a, Program) else a for a in args]
    return " ".join((tools[tool], *(w for w in words if isinstance(w, str))))


def _unit_section(service: Service, description: str) -> dict[str, Value]:
    unit: dict[str, Value] = {"Description": description}
    for key, names in (("Wants", service.wants), ("After", service.after)):
        if names:
            unit[key] = " ".join(names)
    if service.before:
        unit["Before"] = " ".join(service.before)
    if service.reload_with:
        unit["ReloadPropagatedFrom"] = " ".join(service.reload_with)
    unit.update(service.conditions)
    return unit


def unit_files(tools: Mapping[Tool, str], installer: Installer = "install") -> dict[str, str]:
    """The unit files `installer` puts on a non-NixOS host, by file name; `tools` maps each
    Tool their commands run to its path."""
    files: dict[str, str] = {}
    for service in services_for("other", installer):
        body: dict[str, Value] = {"ExecStart": _exec(tools, service.command)}
        if service.stop is not None:
            body["ExecStop"] = _exec(tools, service.stop)
        if service.reload is not None:
            body["ExecReload"] = _exec(tools, service.reload)
        body.update(sorted(service.service.items()))
        sections = [
            _section("Unit", _unit_section(service, service.description)),
            _section("Service", body),
        ]
        if service.wanted_by:
            sections.append(_section("Install", {"WantedBy": " ".join(service.wanted_by)}))
        files[service.unit] = "\n".join(sections)
        if service.timer is not None:
            files[f"{service.name}.timer"] = "\n".join(
                [
                    _section("Unit", {"Description": service.timer.description}),
                    _section("Timer", dict(sorted(service.timer.settings.items()))),
                    _section("Install", {"WantedBy": "timers.target"}),
                ]
            )
    return files


def enabled_units(installer: Installer = "install") -> tuple[str, ...]:
    """What `systemctl enable` gets: services wanted at boot, and every timer."""
    names = []
    for service in services_for("other", installer):
        if service.wanted_by:
            names.append(service.unit)
        if service.timer is not None:
            names.append(f"{service.name}.timer")
    return tuple(names)


def tmpfiles_conf() -> str:
    return "".join(f"{rule}\n" for rule in TMPFILES_RULES)


# ---- the NixOS module ------------------------------------------------------------------------

OPTION = "services.qnix"
PACKAGE = Raw("config.services.qnix.package")
NIX_TOOLS: dict[Tool, Raw] = {
    "qnix": Raw("${config.services.qnix.package}/bin/qnix"),
    "age-keygen": Raw("${pkgs.age}/bin/age-keygen"),
    # The systemd the host runs: its scopes are that manager's.
    "systemd-run": Raw("${config.systemd.package}/bin/systemd-run"),
}


def _nix_argument(argument: Argument) -> str:
    """One argument inside the command's Nix string; a module option's only when set."""
    if isinstance(argument, str):
        return string(" " + argument)[1:-1]
    if isinstance(argument, Program):
        return " " + NIX_TOOLS[argument.tool].code
    option = f"config.{OPTION}.{argument.option}"
    flag = string(" " + argument.flag + " ")[1:-1]
    return f'${{lib.optionalString ({option} != null) "{flag}${{{option}}}"}}'


def _nix_exec(command: Command) -> Raw:
    """`"${store path}/bin/tool arg…"`: the arguments are qnix's own words, escaped anyway."""
    tool, args = command
    return Raw('"' + NIX_TOOLS[tool].code + "".join(map(_nix_argument, args)) + '"')


def _nix_setting(value: Value) -> NixValue:
    if isinstance(value, tuple):
        return list(value)
    return value


def nixos_config() -> dict[str, NixValue]:
    """The `config` the module sets when `services.qnix.enable` is true."""
    services: dict[str, NixValue] = {}
    timers: dict[str, NixValue] = {}
    for service in services_for("nixos"):
        body: dict[str, NixValue] = {"ExecStart": _nix_exec(service.command)}
        if service.stop is not None:
            body["ExecStop"] = _nix_exec(service.stop)
        if service.reload is not None:
            body["ExecReload"] = _nix_exec(service.reload)
        body.update({k: _nix_setting(v) for k, v in service.service.items()})
        unit: dict[str, NixValue] = {"Description": service.description}
        if service.reload_with:
            unit["ReloadPropagatedFrom"] = " ".join(service.reload_with)
        unit.update(service.conditions)
        entry: dict[str, NixValue] = {"serviceConfig": body, "unitConfig": unit}
        for option, names in (
            ("after", service.after),
            ("before", service.before),
            ("wants", service.wants),
            ("wantedBy", service.wanted_by),
        ):
            if names:
                entry[option] = list(names)
        if not service.restart_on_switch:
            entry["restartIfChanged"] = False
        services[service.name] = entry
        if service.timer is not None:
            timers[service.name] = {
                "timerConfig": {k: _nix_setting(v) for k, v in service.timer.settings.items()},
                "unitConfig": {"Description": service.timer.description},
                "wantedBy": ["timers.target"],
            }
    systemd: dict[str, NixValue] = {
        "services": services,
        "tmpfiles": {"rules": list(TMPFILES_RULES)},
    }
    if timers:
        systemd["timers"] = timers
    return {"environment": {"systemPackages": [PACKAGE]}, "systemd": systemd}


# The root flake's `nixosModules.qnix`, committed as MODULE_FILE; the tests regenerate it and
# compare, and `python -c 'from qnix.compile.services import module_file; print(module_file(),
# end="")' > nix/module.nix` writes it after a change of the table.
MODULE_FILE = "nix/module.nix"
MODULE_HEADER = (
    f"# Generated by qnix {__version__} from qnix/compile/services.py; do not edit.\n"
    "# The qnix services of a NixOS host: `services.qnix.enable = true;` (docs/install.md).\n"
)


def nixos_module() -> Function:
    """`{ config, lib, pkgs, ... }: { options.services.qnix = …; config = lib.mkIf …; }`."""
    options: dict[str, NixValue] = {
        "enable": Call(
            Raw("lib.mkEnableOption"),
            "the qnix services: boot, gc and pull timers, host key, state folders",
        ),
        "package": Call(
            Raw("lib.mkOption"),
            {
                "default": Raw("pkgs.callPackage ./package.nix { }"),
                "defaultText": Raw('lib.literalExpression "pkgs.callPackage ./package.nix { }"'),
                "description": "The qnix package the services run.",
                "type": Raw("lib.types.package"),
            },
        ),
        "generation": Call(
            Raw("lib.mkOption"),
            {
                "default": None,
                "description": (
                    "A folder `qnix build` wrote (its manifest.json and the files it lists). "
                    "When set, the boot unit runs `qnix boot --generation` on it at each boot: "
                    "the generation is installed under /var/lib/qnix and the host brought to "
                    "it, with no `qnix apply` by hand. The flake `qnix build` writes sets it "
                    "to its own folder (`./.`). A switch to a new generation leaves the running "
                    "compartments alone; the next boot, or `systemctl restart qnix-boot`, "
                    "brings the host to it. Null: the generation `qnix apply` installed."
                ),
                "example": Raw('lib.literalExpression "./."'),
                "type": Raw("lib.types.nullOr lib.types.path"),
            },
        ),
    }
    return Function(
        ("config", "lib", "pkgs"),
        {
            "config": Call(Raw("lib.mkIf config.services.qnix.enable"), nixos_config()),
            "options": {"services": {"qnix": options}},
        },
    )


def module_file() -> str:
    return MODULE_HEADER + render(nixos_module()) + "\n"
