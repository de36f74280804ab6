"""The live generation and the host's records of it: the bottom of the runtime.

Everything the layers above read about this host: the run root and its lock, the spec of the
live generation (what `apply` installed), a compartment's host identity, link and resolvers,
and the keepers' records (their configuration, KeeperConfig, and the running state they
write). Nothing here starts or stops anything.

A compartment runs as its own unprivileged host account, uid = gid = names.HOST_ID_BASE + its
link slot (`names.allocate_links`: stable, unique per compartment within a spec), with no entry
in /etc/passwd: nothing on the host needs its name, and the number alone owns its home folder
(0700). Inside, the spec's `user` is uid 1000.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qnix.compile import names
from qnix.compile.artifacts import MANIFEST, SPEC_COPY, Artifacts, checked_artifacts, listed_files
from qnix.errors import QnixError
from qnix.runtime import btrfs
from qnix.runtime.backends.namespace import HostIdentity
from qnix.runtime.net import (
    HostNetwork,
    NetRoute,
    Uplink,
    route_table,
)
from qnix.runtime.paths import ENV_HOST_NETNS, RuntimePaths
from qnix.runtime.quickrun import (
    read_state,
    running_state,
)
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, Compartment, Workstation

_SYSTEM_PREFIXES = ("/usr/", "/nix/store/")

_PYTHON_CANDIDATES = ("/usr/bin/python3", "/run/current-system/sw/bin/python3")


# The keeper's process: qnix.runtime.keeper.main with the broker's call server beside it,
# composed in the layer above; the runtime starts it by name and imports nothing of it.
KEEPER_MAIN = "qnix.broker.keeper_main"
READY_TIMEOUT = 90.0  # a VM under TCG boots in seconds, not milliseconds
STOP_GRACE = 3.0


@dataclass(frozen=True, slots=True)
class KeeperConfig:
    """Everything the keeper needs, decided by the command that starts it."""

    name: str
    user: str  # the user inside (uid 1000)
    host_uid: int  # the unprivileged host account the sandbox runs as
    host_gid: int
    home: str | None  # host folder bound as the home; None: a tmpfs
    netns_path: str
    cgroup: str
    memory_bytes: int
    pids: int
    run_dir: str
    agent_socket: str  # bound here, in the run folder (root's), and handed to the agent
    state_file: str
    interpreter: str  # the Python that runs the agent inside
    interpreter_prefix: str | None  # bound read-only when outside /usr and /nix/store
    resolv_conf: str
    stop_grace: float = STOP_GRACE
    # "namespace" (bubblewrap) or "container" (systemd-nspawn)
    isolation: str = "namespace"
    # A disposable: what it is made from, and what of the network is its alone, removed by
    # the keeper when it ends. It also ends when `owner_pid` (the `qnix dispose`) exits.
    template: str | None = None
    owner_pid: int | None = None
    netns_prefix: str = ""
    host_netns: str | None = None
    host_ifname: str | None = None
    address: str | None = None
    gateway: str | None = None
    elements: tuple[tuple[str, str], ...] = ()  # (nft set or map, element)
    # A preloaded disposable waits, owned by nobody, until a `qnix dispose` connects here;
    # it then belongs to that connection and ends when the connection closes.
    claim_socket: str | None = None
    # The state root of the qnix that started the keeper (audit log, homes), for the calls
    # the compartment makes (qnix.broker.calls); None: derived from `home` or the environment.
    state_root: str | None = None
    # The secrets to put at /run/secrets (qnix.runtime.secrets.Delivery: name, source, where)
    # and the host's age identity they are decrypted with.
    secrets: tuple[tuple[str, str, str], ...] = ()
    age_identity: str | None = None
    # A VM: its processors, and its end of the link (the guest holds the address).
    cpus: int = 1
    guest_address: str | None = None
    guest_gateway: str | None = None
    # A GUI compartment: the compositor's socket its Wayland filter connects to (None: no
    # display, also when `gui = true` but no compositor was found at start), and whether its
    # windows may go fullscreen.
    wayland_display: str | None = None
    fullscreen: bool = False

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeeperConfig:
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("a keeper configuration is a JSON object")
        fields["elements"] = tuple((str(k), str(v)) for k, v in fields.get("elements", ()))
        fields["secrets"] = tuple((str(n), str(s), str(w)) for n, s, w in fields.get("secrets", ()))
        return cls(**fields)

    @property
    def disposable(self) -> bool:
        return self.template is not None

    def runtime_paths(self) -> RuntimePaths:
        """The runtime paths of the qnix that started a keeper, from its configuration: the run
        root holds `compartments/<name>`, the cgroup is `<prefix><name>`, and a persistent home is
        `<state root>/compartments/<name>/home` (else the state root of the environment)."""
        run_root = Path(self.run_dir).parent.parent
        prefix = self.cgroup[: len(self.cgroup) - len(self.name)]
        state_root = self.state_root
        if state_root is None and self.home is not None:
            state_root = str(Path(self.home).parents[2])
        defaults = RuntimePaths.from_options(state_root, run_root)
        return RuntimePaths(
            state_root=defaults.state_root,
            run_root=run_root,
            netns_prefix=prefix,
            host_netns=self.host_netns or os.environ.get(ENV_HOST_NETNS) or None,
        ).checked()


# ---- the host's names for a compartment ------------------------------------------------------


def network_for(paths: RuntimePaths) -> HostNetwork:
    return HostNetwork(prefix=paths.netns_prefix, host_netns=paths.host_netns)


def host_identity(ws: Workstation, name: str) -> HostIdentity:
    """The unprivileged host account compartment `name` runs as: HOST_ID_BASE + link slot."""
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    uid = names.host_id(links[name], ws.host.subnet)
    return HostIdentity(uid, uid)


def uplink_of(
    ws: Workstation, compartment: Compartment, link: names.Link | None = None
) -> Uplink | None:
    """The compartment's veth and, behind a net compartment, the route into it. `link`: the
    compartment's /31 when it is not the spec's (a disposable)."""
    if compartment.network == NETWORK_NONE:
        return None
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    route = None
    if compartment.network != NETWORK_UPLINK:
        net = ws.compartments[compartment.network]
        route = NetRoute(
            table=route_table(links[net.name], ws.host.subnet),
            gateway=links[net.name].address,
            host_ifname=names.host_ifname(net.name),
            subnet=ws.host.subnet,
        )
    own = link if link is not None else links[compartment.name]
    return Uplink(names.host_ifname(compartment.name), own, route)


def network_order(ws: Workstation) -> list[Compartment]:
    """Compartments with each net compartment before its clients (the loader rejects cycles)."""

    def depth(compartment: Compartment) -> int:
        steps = 0
        while compartment.network not in (NETWORK_NONE, NETWORK_UPLINK):
            compartment = ws.compartments[compartment.network]
            steps += 1
        return steps

    return sorted(ws.compartments.values(), key=lambda c: (depth(c), c.name))


def _host_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's resolvers, without loopback ones: a compartment cannot reach those."""
    found = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(fields[1]).is_loopback:
                        found.append(fields[1])
    return found


def resolv_conf(ws: Workstation, compartment: Compartment) -> str:
    """/etc/resolv.conf inside: the spec's resolvers (else the host's) for a compartment whose
    firewall allows DNS, none for any other."""
    if not any(rule.dns for rule in compartment.firewall):
        return "# qnix: this compartment's firewall allows no DNS\n"
    servers = list(ws.host.dns_servers) or _host_nameservers()
    return "# qnix: generated from the spec\n" + "".join(f"nameserver {s}\n" for s in servers)


def searchable(path: Path) -> bool:
    """Whether any user can pass through `path` and each folder above it."""
    for folder in (path, *path.parents):
        try:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def agent_interpreter() -> tuple[str, str | None]:
    """The Python that runs the agent inside a compartment and the prefix to bind for it.

    bubblewrap resolves each bind as the compartment's unprivileged user, so the interpreter
    must be reachable by any user: the one running qnix if it is (or lies under /usr or
    /nix/store, which every compartment sees), else the system's python3. The agent needs
    only the standard library."""
    own = os.path.realpath(sys.executable)
    if own.startswith(_SYSTEM_PREFIXES):
        return own, None
    prefix = os.path.realpath(sys.base_prefix)
    if own.startswith(prefix + "/") and searchable(Path(prefix)):
        return own, prefix
    for candidate in _PYTHON_CANDIDATES:
        real = os.path.realpath(candidate)
        if real.startswith(_SYSTEM_PREFIXES) and os.access(real, os.X_OK):
            return real, None
    raise QnixError(
        f"no Python a compartment can run: {own} is in a folder other users cannot enter",
        hint="install python3 from the distribution (/usr/bin/python3) or run qnix with it",
    )


# ---- the run root and the live generation ----------------------------------------------------


def ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> bool:
    """`path` exists with `mode` (and `owner`); True if anything had to change."""
    changed = False
    if not path.is_dir():
        path.mkdir(mode=mode)
        changed = True
    info = path.stat()
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)
        changed = True
    if owner is not None and (info.st_uid, info.st_gid) != owner:
        os.chown(path, *owner)
        changed = True
    return changed


def ensure_root(root: Path) -> None:
    """A root folder (created 0711) that compartment users can pass through."""
    if not root.is_dir():
        root.mkdir(mode=0o711, parents=True)
    if not searchable(root):
        raise QnixError(
            f"{root} or a folder above it is not searchable by other users",
            hint="compartments run as their own users and must pass through it: "
            "`chmod o+x` each folder, or choose another root",
        )


@contextlib.contextmanager
def locked(paths: RuntimePaths) -> Iterator[None]:
    """One changing qnix command at a time on a run root."""
    ensure_root(paths.run_root)
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def live_workstation(paths: RuntimePaths) -> Workstation | None:
    """The spec of the live generation, or None before the first apply (or after `down`)."""
    try:
        data = (paths.generation_dir / SPEC_COPY).read_bytes()
    except FileNotFoundError:
        return None
    return Workstation.model_validate_json(data)


def require_live(paths: RuntimePaths) -> Workstation:
    ws = live_workstation(paths)
    if ws is None:
        # After a reboot the run root is empty until the boot unit has run `qnix boot`: until
        # then nothing starts, and no compartment has a network (fail closed).
        raise QnixError(
            f"no live generation under {paths.run_root}",
            hint="bring the host up: qnix boot (the installed generation)"
            if (paths.installed_dir / SPEC_COPY).exists()
            else "bring the host up: qnix apply SPEC",
        )
    return ws


def installed_generation(paths: RuntimePaths) -> Artifacts | None:
    """The generation `apply` installed (kept under the state root), or None before the
    first apply. A copy that is not whole (a file changed, missing or added) is refused."""
    folder = paths.installed_dir
    if not folder.is_dir():
        return None
    files = {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if not path.is_dir()
    }
    try:
        return checked_artifacts(files)
    except ValueError as exc:
        raise QnixError(
            f"the installed generation {folder} is damaged: {exc}",
            hint="nothing was brought up; bring the host to its spec again: qnix apply SPEC",
        ) from None


def built_generation(folder: Path) -> Artifacts:
    """The generation `qnix build` wrote into `folder` (a flake folder, or its copy in the Nix
    store): manifest.json and the files it lists, each checked against its hash. What else
    the folder holds (flake.lock, .git, a result link) is not part of the generation and is
    not read. A file listed that is missing or differs refuses the whole generation."""
    files: dict[str, bytes] = {}
    try:
        files[MANIFEST] = (folder / MANIFEST).read_bytes()
        for name in listed_files(files[MANIFEST]):
            with contextlib.suppress(FileNotFoundError):  # checked_artifacts names it missing
                files[name] = (folder / name).read_bytes()
        return checked_artifacts(files)
    except FileNotFoundError:
        problem = f"{MANIFEST} is missing"
    except OSError as exc:
        problem = f"cannot read {exc.filename}: {exc.strerror}"
    except ValueError as exc:
        problem = str(exc)
    raise QnixError(
        f"the generation {folder} is damaged: {problem}",
        hint="nothing was brought up; build it again: qnix build SPEC -o DIR",
    )


def compartment_of(ws: Workstation, name: str) -> Compartment:
    compartment = ws.compartments.get(name)
    if compartment is None:
        known = ", ".join(ws.compartments) or "none"
        raise QnixError(f"no compartment {name!r} in the live generation", hint=f"known: {known}")
    return compartment


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ensure_state_dirs(paths: RuntimePaths, name: str, identity: HostIdentity) -> bool:
    ensure_root(paths.state_root)
    changed = ensure_dir(paths.compartments_state, 0o711)
    changed |= ensure_dir(paths.state_dir(name), 0o711)
    home = paths.home(name)
    if not os.path.lexists(home) and btrfs.on_btrfs(paths.state_dir(name)):
        btrfs.create(home)  # a subvolume: its snapshots are btrfs snapshots
        changed = True
    changed |= ensure_dir(home, 0o700, (identity.uid, identity.gid))
    return changed


# ---- keeper records ------------------------------------------------------------------------


def run_names(paths: RuntimePaths) -> list[str]:
    """Compartments with a run folder: running, starting, or left behind by a crash."""
    try:
        return sorted(entry.name for entry in paths.compartments_run.iterdir() if entry.is_dir())
    except FileNotFoundError:
        return []


def read_keeper_config(paths: RuntimePaths, name: str) -> KeeperConfig | None:
    try:
        return KeeperConfig.from_json(paths.keeper_config(name).read_bytes())
    except (OSError, ValueError, TypeError):
        return None


def starting_keeper(paths: RuntimePaths, name: str) -> int | None:
    """The pid of a keeper of `name` that lives but has not recorded its state yet: the
    command that started it was killed, the keeper goes on starting on its own."""
    wanted = str(paths.keeper_config(name)).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if KEEPER_MAIN.encode() in argv and wanted in argv:
            return int(entry)
    return None


def await_started(paths: RuntimePaths, name: str) -> None:
    """Let a start in progress finish (or fail) before anything acts on `name`."""
    deadline = time.monotonic() + READY_TIMEOUT + 15
    while read_state(paths, name) is None and starting_keeper(paths, name) is not None:
        if time.monotonic() > deadline:
            raise QnixError(f"compartment {name} is still starting", hint="try again in a moment")
        time.sleep(0.05)


def running_disposables(paths: RuntimePaths) -> dict[str, KeeperConfig]:
    found = {}
    for name in run_names(paths):
        config = read_keeper_config(paths, name)
        if config is not None and config.disposable and running_state(paths, name) is not None:
            found[name] = config
    return found


def preloaded(paths: RuntimePaths) -> dict[str, KeeperConfig]:
    """Running disposables that wait to be claimed (their claim socket is still there)."""
    return {
        name: config
        for name, config in running_disposables(paths).items()
        if config.claim_socket is not None and os.path.exists(config.claim_socket)
    }
