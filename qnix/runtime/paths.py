"""Where the runtime keeps things on a host, and the names it gives host objects.

Two roots: the state root (default /var/lib/qnix) holds what survives a reboot — each
compartment's home, the audit log, the installed generation (`qnix boot` brings the host up from
it) and the host's public age key; the run root (default /run/qnix) holds what describes the
running host — the live generation, one folder per running compartment (its keeper's state, its
agent socket), the lock. Network namespaces are `<netns_prefix><compartment>` under /run/netns and
cgroups `qnix/<netns_prefix><compartment>`, so two qnix instances with different prefixes (the
host's and a test's) never touch each other's objects.

`host_netns` names the network namespace that stands for the host (None: the one qnix runs in).
It is a testing aid: tests give a namespace they made, so they never touch the real host's
routes, links or nftables ruleset. `desktop_root` stands for `/` where `qnix apply` writes the
desktop's files (menu entries under usr/local/share/applications, the label colours' window
rules under etc/): tests point it at a folder of their own. Each field can come from the
environment (QNIX_STATE_ROOT, QNIX_RUN_ROOT, QNIX_NETNS_PREFIX, QNIX_HOST_NETNS,
QNIX_DESKTOP_ROOT) so that a command run as a subprocess gets it.

Standard library only, and cheap to import: `qnix run` reads these paths on its fast path, so
neither `re` nor `typing` is imported here (each costs milliseconds of every `qnix run`).
"""

from __future__ import annotations

import os
from pathlib import Path

from qnix.fastpath import DIGITS, LETTERS, LOWER, Record, is_word

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_STATE_ROOT = Path("/var/lib/qnix")
DEFAULT_RUN_ROOT = Path("/run/qnix")
DEFAULT_NETNS_PREFIX = "qnix-"

ENV_STATE_ROOT = "QNIX_STATE_ROOT"
ENV_RUN_ROOT = "QNIX_RUN_ROOT"
ENV_NETNS_PREFIX = "QNIX_NETNS_PREFIX"
ENV_HOST_NETNS = "QNIX_HOST_NETNS"
ENV_DESKTOP_ROOT = "QNIX_DESKTOP_ROOT"
DEFAULT_DESKTOP_ROOT = Path("/")


def is_prefix(text: str) -> bool:
    # A prefix plus a compartment name (31 at most) must still be a valid cgroup name (63).
    return is_word(text, LOWER, LOWER + DIGITS + "-", 24)


def is_netns_name(text: str) -> bool:
    return is_word(text, LETTERS + DIGITS, LETTERS + DIGITS + "_.-", 63)


def is_name(text: str) -> bool:
    """Compartment names as the spec allows them (qnix.spec.model.COMPARTMENT_NAME_RE),
    checked here again because a name from the command line becomes a path."""
    return is_word(text, LOWER, LOWER + DIGITS + "-", 31)


# Everything qnix puts in a run root (what `qnix down` removes, and nothing else): the names
# of the run-root paths below.
RUN_ROOT_ENTRIES = (
    "generation",
    "applied.json",
    "qnix.nft",
    "compartments",
    "pool",
    "asks",
    "clipboard",
    "clipboard.lock",
    "lock",
    "vm-accel",  # what KVM's probe found this boot (qnix.runtime.backends.vm)
    "spawner.sock",  # the resident process that forks disposables' keepers
    "spawner.json",
    "spawner.log",
    "vm-initramfs",  # the VM's base initramfs per kernel (qnix.runtime.backends.vm)
    "bytecode",  # the agent compiled for the compartments' interpreter (qnix.runtime.bytecode)
)

AGENT_SOCKET_NAME = "agent.sock"
# The call socket's folder in a compartment's run folder (root's), bound read-only inside.
CALL_DIR_NAME = "call"
CALL_DIR_INSIDE = "/run/qnix-call"
CALL_SOCKET_NAME = "call.sock"


class PathError(ValueError):
    """A root, prefix or name that cannot be used."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not is_name(name):
        raise PathError(
            f"{name!r} is not a compartment name (lower-case letters, digits and '-', "
            "starting with a letter, at most 31)"
        )
    return name


class RuntimePaths(Record):
    """Immutable. A Record rather than a frozen dataclass or NamedTuple: importing
    dataclasses or typing costs `qnix run` more than everything else it imports.
    `from_options` validates; code that builds one directly calls `checked()`."""

    __slots__ = ("desktop_root", "host_netns", "netns_prefix", "run_root", "state_root")
    _FIELDS = ("state_root", "run_root", "netns_prefix", "host_netns", "desktop_root")
    state_root: Path
    run_root: Path
    netns_prefix: str
    host_netns: str | None
    desktop_root: Path

    def __init__(
        self,
        state_root: Path = DEFAULT_STATE_ROOT,
        run_root: Path = DEFAULT_RUN_ROOT,
        netns_prefix: str = DEFAULT_NETNS_PREFIX,
        host_netns: str | None = None,
        desktop_root: Path = DEFAULT_DESKTOP_ROOT,
    ) -> None:
        super().__init__(state_root, run_root, netns_prefix, host_netns, desktop_root)

    def checked(self) -> RuntimePaths:
        for root in (self.state_root, self.run_root):
            if not root.is_absolute():
                raise PathError(f"{root} must be an absolute path")
            if root == root.parent:
                raise PathError(f"{root} cannot be a state or run root: name a folder of its own")
        if not self.desktop_root.is_absolute():
            raise PathError(f"{self.desktop_root} must be an absolute path")
        if not is_prefix(self.netns_prefix):
            raise PathError(
                f"namespace prefix {self.netns_prefix!r} must be lower-case letters, digits "
                "and '-', starting with a letter, at most 24"
            )
        if self.host_netns is not None and not is_netns_name(self.host_netns):
            raise PathError(f"{self.host_netns!r} is not a network namespace name")
        return self

    @classmethod
    def from_options(
        cls,
        state_root: str | Path | None = None,
        run_root: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> RuntimePaths:
        """Options first, then the environment, then the defaults."""
        env = os.environ if environ is None else environ
        state = state_root or env.get(ENV_STATE_ROOT) or DEFAULT_STATE_ROOT
        run = run_root or env.get(ENV_RUN_ROOT) or DEFAULT_RUN_ROOT
        return cls(
            state_root=Path(os.path.abspath(state)),
            run_root=Path(os.path.abspath(run)),
            netns_prefix=env.get(ENV_NETNS_PREFIX) or DEFAULT_NETNS_PREFIX,
            host_netns=env.get(ENV_HOST_NETNS) or None,
            desktop_root=Path(os.path.abspath(env.get(ENV_DESKTOP_ROOT) or DEFAULT_DESKTOP_ROOT)),
        ).checked()

    # ---- run root ------------------------------------------------------------------------

    @property
    def generation_dir(self) -> Path:
        """The live generation: the compiled Artifacts the host was last brought to."""
        return self.run_root / "generation"

    @property
    def applied_file(self) -> Path:
        """What `apply` did beyond the generation: resolved names, the loaded table's hash."""
        return self.run_root / "applied.json"

    @property
    def nft_transaction_file(self) -> Path:
        """The table as `apply` last loaded it (host-name sets filled), for `gc` to reload."""
        return self.run_root / "qnix.nft"

    @property
    def lock_file(self) -> Path:
        return self.run_root / "lock"

    @property
    def asks_dir(self) -> Path:
        """Questions of `ask` lines that calls from compartments wait on."""
        return self.run_root / "asks"

    @property
    def clipboard_file(self) -> Path:
        """The host's one global clipboard (qnix.broker.clipboard)."""
        return self.run_root / "clipboard"

    @property
    def clipboard_lock(self) -> Path:
        return self.run_root / "clipboard.lock"

    @property
    def spawner_socket(self) -> Path:
        """Where the spawner (qnix.runtime.spawner) takes requests: root only."""
        return self.run_root / "spawner.sock"

    @property
    def spawner_record(self) -> Path:
        """The running spawner's pid and start time."""
        return self.run_root / "spawner.json"

    @property
    def pool_root(self) -> Path:
        """Preloaded disposables wait here: `<template>/<name>.sock`, their keepers' claim
        sockets (root only), removed once claimed."""
        return self.run_root / "pool"

    def pool_dir(self, template: str) -> Path:
        return self.pool_root / check_name(template)

    @property
    def pool_file(self) -> Path:
        """The default template and each template's preload, for `qnix dispose`'s fast path."""
        return self.pool_root / "pool.json"

    @property
    def compartments_run(self) -> Path:
        return self.run_root / "compartments"

    def run_dir(self, name: str) -> Path:
        return self.compartments_run / check_name(name)

    def state_file(self, name: str) -> Path:
        """Written by the keeper once the compartment's agent is ready."""
        return self.run_dir(name) / "state.json"

    def keeper_config(self, name: str) -> Path:
        return self.run_dir(name) / "keeper.json"

    def keeper_log(self, name: str) -> Path:
        return self.run_dir(name) / "keeper.log"

    def agent_socket(self, name: str) -> Path:
        """Bound by the keeper in the run folder, which only root may change, and handed to
        the agent inside as a descriptor: no folder of the host is writable from inside."""
        return self.run_dir(name) / AGENT_SOCKET_NAME

    # ---- state root ----------------------------------------------------------------------

    @property
    def compartments_state(self) -> Path:
        return self.state_root / "compartments"

    def state_dir(self, name: str) -> Path:
        return self.compartments_state / check_name(name)

    def home(self, name: str) -> Path:
        return self.state_dir(name) / "home"

    @property
    def audit_log(self) -> Path:
        return self.state_root / "audit" / "events.jsonl"

    @property
    def installed_dir(self) -> Path:
        """The installed generation: a copy of the one `apply` last brought the host to, kept
        across reboots, from which `qnix boot` brings the host up again (/run is empty then)."""
        return self.state_root / "installed"

    @property
    def recipient_file(self) -> Path:
        """The public key of the host's age identity (`age-keygen -y`), what snapshots are
        encrypted to: not secret, so every stop can read it without the identity."""
        return self.state_root / "host.recipient"

    # ---- host object names ---------------------------------------------------------------

    # ---- the desktop (docs/gui.md "Colours and menus") -------------------------------------

    @property
    def applications_dir(self) -> Path:
        """The XDG applications folder of the host's menus (for software not from the distro)."""
        return self.desktop_root / "usr/local/share/applications"

    @property
    def sway_config_dir(self) -> Path:
        """What sway's default config includes (`include /etc/sway/config.d/*`)."""
        return self.desktop_root / "etc/sway/config.d"

    @property
    def hyprland_rules_dir(self) -> Path:
        """Where the Hyprland rules go; a Hyprland config sources the file."""
        return self.desktop_root / "etc/qnix"

    def netns(self, name: str) -> str:
        return self.netns_prefix + check_name(name)

    def netns_path(self, name: str) -> Path:
        return Path("/run/netns") / self.netns(name)

    def cgroup_name(self, name: str) -> str:
        return self.netns(name)


def call_dir(run_dir: str | Path) -> Path:
    """The host folder bound read-only at CALL_DIR_INSIDE: root's, holding only the socket."""
    return Path(run_dir) / CALL_DIR_NAME
