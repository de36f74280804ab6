"""Bringing a host to a spec, and the life of its compartments on it.

`apply` compiles the spec and makes the host match it, in an order that never leaves a moment
with forwarding on and no filter: the nft table first (one transaction), then forwarding, then
each compartment's namespace and link (a net compartment before its clients), its state
folders, the live generation, and last the autostart compartments. Every step looks before it
acts, so a second apply changes nothing and says so. Compartments that left the spec are
stopped and their namespace, link and run folder removed (their state too with `purge`).

A compartment runs as its own unprivileged host account, uid = gid = names.HOST_ID_BASE + its link
slot (`names.allocate_links`: stable, unique per compartment within a spec), with no entry in
/etc/passwd: nothing on the host needs its name, and the number alone owns its home folder
(0700). Inside, the spec's `user` is uid 1000.

`start` hands a compartment to a keeper process (qnix.runtime.keeper) and returns once its
agent answers; `stop` asks the keeper to end it and waits; `run` goes through the agent
(qnix.runtime.quickrun). `down` removes all of qnix's runtime from the host and keeps the
state; `gc` removes what a crash left behind. Every start, stop, run and dispose is recorded
through qnix.audit.events.record.

`dispose` makes a disposable `disp<N>` from a template: a tmpfs home, a namespace and a /31 of
its own (the first free slot from the hash of its name), and elements in the nft table that
send it to its template's chain (qnix.compile.nft). Its keeper removes all of it when the
command ends, or when the `qnix dispose` that owns it exits, however it exits; `apply` keeps a
running disposable's elements when it reloads the table.

`apply`, `start`, `dispose`, `down` and `gc` first make sure the host's network is not another
qnix instance's (qnix.runtime.hostowner); `apply` marks the table it loads as this one's.

Every isolation level starts: namespace (bubblewrap), container (systemd-nspawn) and vm (QEMU);
see qnix.runtime.backends.
"""

from __future__ import annotations

import _socket
import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from qnix.audit import events
from qnix.compile import names, openings
from qnix.compile.artifacts import RULESET, SPEC_COPY, compile_spec
from qnix.compile.nft import TABLE, disposable_elements, hostname_sets
from qnix.errors import QnixError
from qnix.runtime import btrfs, cgroups, hostowner, secrets, storage
from qnix.runtime.agent import AgentError, ProtocolError
from qnix.runtime.backends import container, vm
from qnix.runtime.backends.namespace import HostIdentity
from qnix.runtime.files import atomic_write, replace_tree
from qnix.runtime.keeper import READY_TIMEOUT, KeeperConfig, last_lines, teardown_network
from qnix.runtime.net import (
    HostNetwork,
    NetRoute,
    Uplink,
    element_statements,
    require_root,
    route_table,
    table_comment,
)
from qnix.runtime.paths import RUN_ROOT_ENTRIES, RuntimePaths
from qnix.runtime.quickrun import (
    claim_preloaded,
    execute,
    keeper_alive,
    read_state,
    refill_in_background,
    running_state,
)
from qnix.spec.load import LoadedSpec
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, Compartment, Workstation

STOP_TIMEOUT = 15.0
# `qnix dispose` turns these into an orderly exit, so that its disposable is removed.
DISPOSE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_SYSTEM_PREFIXES = ("/usr/", "/nix/store/")
_PYTHON_CANDIDATES = ("/usr/bin/python3", "/run/current-system/sw/bin/python3")


# ---- small pieces ---------------------------------------------------------------------------


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


def _searchable(path: Path) -> bool:
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
    if own.startswith(prefix + "/") and _searchable(Path(prefix)):
        return own, prefix
    for candidate in _PYTHON_CANDIDATES:
        real = os.path.realpath(candidate)
        if real.startswith(_SYSTEM_PREFIXES) and os.access(real, os.X_OK):
            return real, None
    raise QnixError(
        f"no Python a compartment can run: {own} is in a folder other users cannot enter",
        hint="install python3 from the distribution (/usr/bin/python3) or run qnix with it",
    )


def _ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> bool:
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


def _ensure_root(root: Path) -> None:
    """A root folder (created 0711) that compartment users can pass through."""
    if not root.is_dir():
        root.mkdir(mode=0o711, parents=True)
    if not _searchable(root):
        raise QnixError(
            f"{root} or a folder above it is not searchable by other users",
            hint="compartments run as their own users and must pass through it: "
            "`chmod o+x` each folder, or choose another root",
        )


@contextlib.contextmanager
def locked(paths: RuntimePaths) -> Iterator[None]:
    """One changing qnix command at a time on a run root."""
    _ensure_root(paths.run_root)
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


def _require_live(paths: RuntimePaths) -> Workstation:
    ws = live_workstation(paths)
    if ws is None:
        raise QnixError(
            f"no live generation under {paths.run_root}", hint="bring the host up: qnix apply SPEC"
        )
    return ws


def _compartment(ws: Workstation, name: str) -> Compartment:
    compartment = ws.compartments.get(name)
    if compartment is None:
        known = ", ".join(ws.compartments) or "none"
        raise QnixError(f"no compartment {name!r} in the live generation", hint=f"known: {known}")
    return compartment


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _run_names(paths: RuntimePaths) -> list[str]:
    """Compartments with a run folder: running, starting, or left behind by a crash."""
    try:
        return sorted(entry.name for entry in paths.compartments_run.iterdir() if entry.is_dir())
    except FileNotFoundError:
        return []


# ---- starting and stopping ------------------------------------------------------------------


def _read_keeper_config(paths: RuntimePaths, name: str) -> KeeperConfig | None:
    try:
        return KeeperConfig.from_json(paths.keeper_config(name).read_bytes())
    except (OSError, ValueError, TypeError):
        return None


def _starting_keeper(paths: RuntimePaths, name: str) -> int | None:
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
        if b"qnix.runtime.keeper" in argv and wanted in argv:
            return int(entry)
    return None


def _await_started(paths: RuntimePaths, name: str) -> None:
    """Let a start in progress finish (or fail) before anything acts on `name`."""
    deadline = time.monotonic() + READY_TIMEOUT + 15
    while read_state(paths, name) is None and _starting_keeper(paths, name) is not None:
        if time.monotonic() > deadline:
            raise QnixError(f"compartment {name} is still starting", hint="try again in a moment")
        time.sleep(0.05)


def _cleanup_run(paths: RuntimePaths, name: str) -> bool:
    """Remove what a run of `name` leaves when its keeper is gone: cgroup, run folder, and
    for a disposable its network. A keeper still starting is waited for, never cut short."""
    _await_started(paths, name)
    if running_state(paths, name) is not None:
        return False
    changed = False
    config = _read_keeper_config(paths, name)
    if config is not None and config.disposable:
        teardown_network(config)
        changed = True
    host = cgroups.detect()
    # With the sub-cgroups a container's systemd-nspawn makes.
    cgroup = container.cgroup_tree(cgroups.cgroup_of(paths.cgroup_name(name), host))
    if any(path.exists() for path in cgroup.paths):
        cgroups.kill(cgroup)
        cgroups.remove(cgroup)
        changed = True
    if paths.run_dir(name).exists():
        shutil.rmtree(paths.run_dir(name))
        changed = True
    return changed


def _keeper_config(
    paths: RuntimePaths,
    ws: Workstation,
    compartment: Compartment,
    identity: HostIdentity,
    **disposable: Any,
) -> KeeperConfig:
    interpreter, prefix = agent_interpreter()
    name = compartment.name
    guest: dict[str, Any] = {}
    if compartment.isolation == vm.ISOLATION:
        guest["cpus"] = compartment.cpus
        if compartment.network != NETWORK_NONE:
            address, gateway = disposable.get("address"), disposable.get("gateway")
            if address is None:  # not a disposable: the spec's own link
                link = names.allocate_links(ws.compartments, ws.host.subnet)[name]
                address, gateway = link.address, link.gateway
            guest |= {"guest_address": address, "guest_gateway": gateway}
    return KeeperConfig(
        name=name,
        user=compartment.user,
        host_uid=identity.uid,
        host_gid=identity.gid,
        home=None if compartment.persistence == "disposable" else str(paths.home(name)),
        netns_path=str(paths.netns_path(name)),
        cgroup=paths.cgroup_name(name),
        memory_bytes=compartment.memory_mb << 20,
        pids=compartment.pids,
        run_dir=str(paths.run_dir(name)),
        agent_socket=str(paths.agent_socket(name)),
        state_file=str(paths.state_file(name)),
        interpreter=interpreter,
        interpreter_prefix=prefix,
        resolv_conf=resolv_conf(ws, compartment),
        state_root=str(paths.state_root),
        isolation=compartment.isolation,
        **secrets.keeper_fields(paths, ws, compartment),
        **disposable,
        **guest,
    )


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return data.decode(errors="replace") + "(no answer in time)"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _spawn_keeper(paths: RuntimePaths, config: KeeperConfig) -> None:
    name = config.name
    atomic_write(paths.keeper_config(name), config.to_json(), 0o600)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    log = os.open(paths.keeper_log(name), flags, 0o600)
    ready_read, ready_write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", "qnix.runtime.keeper", str(paths.keeper_config(name))],
            stdin=subprocess.DEVNULL,
            stdout=ready_write,
            stderr=log,
            start_new_session=True,  # the keeper outlives this command
            close_fds=True,
        )
    finally:
        os.close(ready_write)
        os.close(log)
    try:
        answer = _read_line(ready_read, READY_TIMEOUT + 15)
    finally:
        os.close(ready_read)
    if answer == "ready":
        secrets.record_delivered(paths, name, config.secrets)
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    if process.poll() is None:
        process.kill()
        process.wait()
    # bubblewrap's own complaints land in the keeper's log
    log_tail = "\n".join(last_lines(paths.keeper_log(name), 20) or [])
    _cleanup_run(paths, name)
    needs = {
        vm.ISOLATION: "are QEMU, busybox-static and a kernel (linux-image-amd64) installed?",
        container.ISOLATION: "is systemd-nspawn (systemd-container) installed?",
    }.get(
        config.isolation,
        "is bubblewrap installed, are user namespaces enabled (user.max_user_namespaces)?",
    )
    raise QnixError(
        f"compartment {name} did not start: {answer.removeprefix('error: ') or 'no answer'}"
        + (f"\n{log_tail}" if log_tail else ""),
        hint=f"qnix --debug start shows each command; {needs}",
    )


def _start(paths: RuntimePaths, ws: Workstation, name: str) -> bool:
    """Start `name` unless it runs; True if it was started. The caller holds the lock."""
    compartment = _compartment(ws, name)
    if running_state(paths, name) is not None:
        return False
    hostowner.require_host_network(paths, network_for(paths))
    _cleanup_run(paths, name)  # whatever a crash left
    if not paths.netns_path(name).exists():
        raise QnixError(
            f"compartment {name} has no network namespace", hint="bring the host up: qnix apply"
        )
    identity = host_identity(ws, name)
    if compartment.persistence != "disposable":
        _ensure_state_dirs(paths, name, identity)
    _ensure_root(paths.run_root)
    _ensure_dir(paths.compartments_run, 0o711)
    _ensure_dir(paths.run_dir(name), 0o711)
    try:
        _spawn_keeper(paths, _keeper_config(paths, ws, compartment, identity))
    except QnixError as exc:
        _cleanup_run(paths, name)  # refused before any keeper (e.g. no age identity): no trace
        events.record(paths, "start", compartment=name, result=f"error: {exc.message}")
        raise
    events.record(paths, "start", compartment=name, result="ok")
    return True


def _wait_gone(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


def _stop(
    paths: RuntimePaths, name: str, timeout: float = STOP_TIMEOUT, *, audit: bool = True
) -> bool:
    """Stop `name` if it runs; True if it ran. Leftovers of a crashed run are removed too."""
    _await_started(paths, name)
    state = read_state(paths, name)
    if state is None or not keeper_alive(state):
        _cleanup_run(paths, name)
        return False
    try:
        pidfd = os.pidfd_open(state["keeper_pid"])
    except ProcessLookupError:
        _cleanup_run(paths, name)
        return False
    try:
        # Signals through the pidfd cannot hit another process that reused the pid.
        if keeper_alive(state):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _wait_gone(pidfd, timeout):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                _wait_gone(pidfd, timeout)
    finally:
        os.close(pidfd)
    _cleanup_run(paths, name)
    if audit:
        events.record(paths, "stop", compartment=name, result="ok")
    from qnix.runtime.state import snapshot_after_stop  # here: qnix.runtime.state imports us

    snapshot_after_stop(paths, name)  # never raises: a failure is an audit event and a warning
    return True


def start(paths: RuntimePaths, name: str) -> bool:
    require_root()
    with locked(paths):
        return _start(paths, _require_live(paths), name)


def stop(paths: RuntimePaths, name: str) -> bool:
    require_root()
    with locked(paths):
        ws = _require_live(paths)
        if name not in _running_disposables(paths):
            _compartment(ws, name)
        return _stop(paths, name)


def restart(paths: RuntimePaths, name: str) -> None:
    require_root()
    with locked(paths):
        ws = _require_live(paths)
        _compartment(ws, name)
        _stop(paths, name)
        _start(paths, ws, name)


def run(paths: RuntimePaths, name: str, argv: Sequence[str], user: str | None = None) -> int:
    """Run argv in `name` with our stdio (starting it first if needed); its exit code."""
    ws = _require_live(paths)
    state = running_state(paths, name)
    if name in ws.compartments or state is None or name not in _running_disposables(paths):
        inside = _compartment(ws, name).user
    else:
        inside = str(state["user"])  # a running disposable
    if user is not None and user != inside:
        raise QnixError(
            f"compartment {name} has one user, {inside!r}; there is no {user!r} inside",
            hint=f"leave out --user, or pass --user {inside}",
        )
    if state is None:
        require_root()
        with locked(paths):
            _start(paths, ws, name)
        state = running_state(paths, name)
        if state is None:
            raise QnixError(f"compartment {name} stopped right after it started")
    try:
        return execute(paths, name, state, argv)
    except Exception as exc:
        raise QnixError(f"cannot run in {name}: {exc}") from exc


# ---- disposables -------------------------------------------------------------------------------


def _running_disposables(paths: RuntimePaths) -> dict[str, KeeperConfig]:
    found = {}
    for name in _run_names(paths):
        config = _read_keeper_config(paths, name)
        if config is not None and config.disposable and running_state(paths, name) is not None:
            found[name] = config
    return found


def _free_disposable_name(paths: RuntimePaths, ws: Workstation) -> str:
    number = 1
    while True:
        name = f"disp{number}"
        taken = name in ws.compartments or paths.run_dir(name).exists()
        if not taken and not paths.netns_path(name).exists():
            return name
        number += 1


def disposable_link(ws: Workstation, name: str, taken_by_disposables: set[int]) -> names.Link:
    """The /31 of disposable `name`: the first free slot from the hash of its name."""
    slot = _free_slot(ws, name, taken_by_disposables)
    gateway = ipaddress.IPv4Network(ws.host.subnet).network_address + 2 * slot
    return names.Link(str(gateway), str(gateway + 1))


def _free_slot(ws: Workstation, name: str, taken_by_disposables: set[int]) -> int:
    """A /31 slot no compartment of the spec and no running disposable holds: by the hash of
    the name, probing upwards (as names.allocate_links does)."""
    network = ipaddress.IPv4Network(ws.host.subnet)
    slots = network.num_addresses // 2
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    taken = {0} | {names.link_slot(link.gateway, ws.host.subnet) for link in links.values()}
    taken |= taken_by_disposables
    if len(taken) >= slots:
        raise QnixError(f"no free link left in {ws.host.subnet} for a disposable")
    slot = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) % slots
    while slot in taken:
        slot = (slot + 1) % slots
    return slot


def _create_disposable(
    paths: RuntimePaths, ws: Workstation, template_name: str | None, *, preload: bool = False
) -> KeeperConfig:
    """A fresh disposable from a template, running: namespace, link, nft elements, keeper
    (which ends it, and removes all of it, when this process exits — or, preloaded, when the
    `qnix dispose` that claims it exits)."""
    chosen = template_name or ws.default_disposable
    if chosen is None:
        raise QnixError(
            "no disposable template named, and the spec has no default_disposable",
            hint="qnix dispose --template NAME -- COMMAND",
        )
    template = ws.disposable_templates.get(chosen)
    if template is None:
        known = ", ".join(ws.disposable_templates) or "none"
        raise QnixError(f"no disposable template {chosen!r}", hint=f"known: {known}")
    running = _running_disposables(paths)
    name = _free_disposable_name(paths, ws)
    compartment = Compartment.model_validate(
        {
            **{key: value for key, value in template if key != "preload"},
            "name": name,
            "persistence": "disposable",
        }
    )
    taken = {
        names.link_slot(c.gateway, ws.host.subnet)
        for c in running.values()
        if c.gateway is not None
    }
    link = disposable_link(ws, name, taken)
    slot = names.link_slot(link.gateway, ws.host.subnet)
    uplink = uplink_of(ws, compartment, link)
    extra: dict[str, Any] = {
        "template": chosen,
        "owner_pid": None if preload else os.getpid(),
        "netns_prefix": paths.netns_prefix,
        "host_netns": paths.host_netns,
        "claim_socket": str(paths.pool_dir(chosen) / f"{name}.sock") if preload else None,
    }
    if uplink is not None:
        elements = disposable_elements(ws, chosen, uplink.host_ifname, link.address)
        extra |= {
            "host_ifname": uplink.host_ifname,
            "address": link.address,
            "gateway": link.gateway,
            "elements": tuple(elements.items()),
        }
    identity = HostIdentity(names.HOST_ID_BASE + slot, names.HOST_ID_BASE + slot)
    config = _keeper_config(paths, ws, compartment, identity, **extra)
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    try:
        net.ensure_netns(name)
        if uplink is not None:
            net.ensure_link(name, uplink)
            net.add_elements(config.elements)
        _ensure_root(paths.run_root)
        _ensure_dir(paths.compartments_run, 0o711)
        _ensure_dir(paths.run_dir(name), 0o711)
        if preload:
            _ensure_dir(paths.pool_root, 0o700)
            _ensure_dir(paths.pool_dir(chosen), 0o700)
        _spawn_keeper(paths, config)
    except BaseException:
        teardown_network(config)
        _cleanup_run(paths, name)
        raise
    return config


def preloaded(paths: RuntimePaths) -> dict[str, KeeperConfig]:
    """Running disposables that wait to be claimed (their claim socket is still there)."""
    return {
        name: config
        for name, config in _running_disposables(paths).items()
        if config.claim_socket is not None and os.path.exists(config.claim_socket)
    }


def write_pool_file(paths: RuntimePaths, ws: Workstation) -> None:
    """What `qnix dispose`'s fast path needs to know without reading the spec."""
    pool = {
        "default": ws.default_disposable,
        "preload": {name: t.preload for name, t in sorted(ws.disposable_templates.items())},
    }
    _ensure_dir(paths.pool_root, 0o700)
    data = (json.dumps(pool, indent=2, sort_keys=True) + "\n").encode()
    if not paths.pool_file.exists() or paths.pool_file.read_bytes() != data:
        atomic_write(paths.pool_file, data, 0o600)


def fill_pools(paths: RuntimePaths, ws: Workstation) -> list[str]:
    """Start preloaded disposables until each template has its `preload`; stop the ones a
    template no longer wants. The caller holds the lock."""
    changes = []
    waiting: dict[str, list[str]] = {}
    for name, config in sorted(preloaded(paths).items()):
        waiting.setdefault(config.template or "", []).append(name)
    for template_name, template in sorted(ws.disposable_templates.items()):
        have = waiting.pop(template_name, [])
        for name in have[template.preload :]:
            _stop(paths, name, audit=False)
            changes.append(f"{name}: stopped (more preloaded {template_name} than wanted)")
        for _ in range(template.preload - len(have)):
            config = _create_disposable(paths, ws, template_name, preload=True)
            events.record(
                paths,
                "start",
                compartment=config.name,
                template=template_name,
                result="ok",
                preloaded=True,
            )
            changes.append(f"{config.name}: preloaded disposable of {template_name}")
    for names_left in waiting.values():
        for name in names_left:
            _stop(paths, name, audit=False)
            changes.append(f"{name}: stopped (its template is gone)")
    return changes


def refill_pools(paths: RuntimePaths) -> list[str]:
    """Top up the preloaded disposables of the live generation (after one was claimed)."""
    require_root()
    if not paths.generation_dir.exists():
        return []  # `qnix down` came first: recreate nothing of the run root
    with locked(paths):
        ws = live_workstation(paths)
        return [] if ws is None else fill_pools(paths, ws)


def _exit_on_signal(number: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + number)


@contextlib.contextmanager
def new_disposable(
    paths: RuntimePaths, template: str | None = None
) -> Iterator[tuple[KeeperConfig, dict[str, Any]]]:
    """A disposable of `template` (its keeper configuration and running state) for several
    commands (open-in-disposable, calls to @dispvm): a preloaded one when the template has
    one ready, else a fresh one. Gone when the block ends, however it ends; usable from any
    thread (a keeper's call server)."""
    require_root()
    with locked(paths):
        ws = _require_live(paths)
    chosen = template or ws.default_disposable
    claimed = claim_preloaded(paths, chosen) if chosen is not None else None
    if claimed is not None:
        with _claimed_disposable(paths, *claimed) as used:
            yield used
        return
    with locked(paths):
        config = _create_disposable(paths, _require_live(paths), template)
    # Signals reach the main thread only: there, ending by one still removes the disposable.
    in_main = threading.current_thread() is threading.main_thread()
    previous = (
        {number: signal.signal(number, _exit_on_signal) for number in DISPOSE_SIGNALS}
        if in_main
        else {}
    )
    try:
        state = running_state(paths, config.name)
        if state is None:
            raise QnixError(f"disposable {config.name} ended before it could be used")
        yield config, state
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop(paths, config.name, audit=False)
        teardown_network(config)


@contextlib.contextmanager
def _claimed_disposable(
    paths: RuntimePaths, name: str, connection: _socket.socket
) -> Iterator[tuple[KeeperConfig, dict[str, Any]]]:
    """A preloaded disposable this process claimed: it ends when `connection` closes (also
    when this process dies); the block ends once its keeper has removed all of it."""
    state = running_state(paths, name)
    try:
        if state is None:
            raise QnixError(f"preloaded disposable {name} ended before it could be used")
        config = KeeperConfig.from_json(paths.keeper_config(name).read_bytes())
        yield config, state
    finally:
        refill_in_background(paths)
        connection.close()
        # The keeper exits after it has removed the disposable.
        deadline = time.monotonic() + READY_TIMEOUT
        while state is not None and keeper_alive(state) and time.monotonic() < deadline:
            time.sleep(0.02)


def dispose(paths: RuntimePaths, argv: Sequence[str], template: str | None = None) -> int:
    """Run argv in a fresh disposable with our stdio; when it ends (or this command is
    stopped or killed) nothing of the disposable is left. Its exit code."""
    require_root()
    with locked(paths):
        config = _create_disposable(paths, _require_live(paths), template)
    name = config.name
    previous = {number: signal.signal(number, _exit_on_signal) for number in DISPOSE_SIGNALS}
    try:
        state = running_state(paths, name)
        if state is None:
            raise QnixError(f"disposable {name} ended before its command could run")
        try:
            return execute(paths, name, state, argv, event="dispose", template=config.template)
        except (AgentError, ProtocolError) as exc:
            raise QnixError(f"cannot run in disposable {name}: {exc}") from exc
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop(paths, name, audit=False)
        teardown_network(config)


# ---- status -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    name: str
    label: str
    isolation: str
    state: str  # running, stopped, or crashed (a run folder without its keeper: see gc)
    network: str
    address: str | None
    gateway: str | None
    memory_mb: int
    memory_used: int | None  # bytes, while running
    persistence: str
    autostart: bool
    pid: int | None  # the keeper's
    template: str | None = None  # a running disposable's

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _memory_used(paths: RuntimePaths, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, QnixError):
        cgroup = cgroups.cgroup_of(paths.cgroup_name(name), cgroups.detect())
        for path in cgroup.paths:
            for file in ("memory.current", "memory.usage_in_bytes"):
                if (path / file).exists():
                    return int((path / file).read_text())
    return None


def statuses(paths: RuntimePaths) -> list[Status]:
    ws = live_workstation(paths)
    if ws is None:
        return []
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    found = []
    for compartment in ws.compartments.values():
        name = compartment.name
        state = read_state(paths, name)
        if state is not None and keeper_alive(state):
            status, pid = "running", int(state["keeper_pid"])
        else:
            status, pid = ("crashed" if paths.run_dir(name).exists() else "stopped"), None
        networked = compartment.network != NETWORK_NONE
        found.append(
            Status(
                name=name,
                label=compartment.label,
                isolation=compartment.isolation,
                state=status,
                network=compartment.network,
                address=links[name].address if networked else None,
                gateway=links[name].gateway if networked else None,
                memory_mb=compartment.memory_mb,
                memory_used=_memory_used(paths, name) if status == "running" else None,
                persistence=compartment.persistence,
                autostart=compartment.autostart,
                pid=pid,
            )
        )
    waiting = preloaded(paths)
    for name, config in sorted(_running_disposables(paths).items()):
        state = read_state(paths, name)
        template = ws.disposable_templates.get(config.template or "")
        found.append(
            Status(
                name=name,
                label=template.label if template is not None else "red",
                isolation=template.isolation if template is not None else "namespace",
                state="preloaded" if name in waiting else "running",
                network=template.network if template is not None else NETWORK_NONE,
                address=config.address,
                gateway=config.gateway,
                memory_mb=config.memory_bytes >> 20,
                memory_used=_memory_used(paths, name),
                persistence="disposable",
                autostart=False,
                pid=int(state["keeper_pid"]) if state is not None else None,
                template=config.template,
            )
        )
    return found


# ---- apply ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyResult:
    generation: str
    changes: tuple[str, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # of the host, not of the spec (on stderr)


def _ensure_state_dirs(paths: RuntimePaths, name: str, identity: HostIdentity) -> bool:
    _ensure_root(paths.state_root)
    changed = _ensure_dir(paths.compartments_state, 0o711)
    changed |= _ensure_dir(paths.state_dir(name), 0o711)
    home = paths.home(name)
    if not os.path.lexists(home) and btrfs.on_btrfs(paths.state_dir(name)):
        btrfs.create(home)  # a subvolume: its snapshots are btrfs snapshots
        changed = True
    changed |= _ensure_dir(home, 0o700, (identity.uid, identity.gid))
    return changed


def table_transaction(
    ws: Workstation, ruleset: str, net: HostNetwork
) -> tuple[str, dict[str, Any]]:
    """The compiled table plus its host-name sets filled with what the names resolve to now."""
    named_sets = hostname_sets(ws)
    answers = net.resolve(sorted({(named.hostname, named.family) for named in named_sets}))
    resolved = {n.set_name: list(answers[(n.hostname, n.family)]) for n in named_sets}
    return filled_transaction(ruleset, resolved), resolved


def filled_transaction(ruleset: str, resolved: dict[str, list[str]]) -> str:
    """The table followed by the addresses of its host-name sets (`qnix drift` rebuilds what
    apply loaded from the resolved addresses apply recorded)."""
    lines = [ruleset]
    for set_name, addresses in resolved.items():
        if addresses:
            lines.append(f"add element {TABLE} {set_name} {{ {', '.join(addresses)} }}\n")
    return "".join(lines)


def _net_tables_drifted(net: HostNetwork, ws: Workstation) -> list[str]:
    """Net compartments whose masquerade table was changed by hand since it was loaded."""
    from qnix.runtime.drift import net_table_differences  # drift builds on this module

    return sorted({d.subject.split(":", 1)[0] for d in net_table_differences(net, ws)})


def _table_drifted(net: HostNetwork, wanted: str) -> bool:
    """Whether the loaded table differs from `wanted` in anything, elements included (such as
    an opening deleted by hand), which the shape and hashes above do not see."""
    from qnix.runtime.drift import table_differences  # drift builds on this module

    return bool(table_differences(net, wanted))


def _holds_exactly(folder: Path, files: Mapping[str, bytes]) -> bool:
    """Whether `folder` holds these files and no others, byte for byte: a generation file
    changed by hand is put back."""
    found = (
        {str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir()}
        if folder.is_dir()
        else set()
    )
    if found != set(files):
        return False
    return all((folder / name).read_bytes() == data for name, data in files.items())


def _table_shape(listing: str) -> str:
    """A table listing without the elements of its sets and maps: running disposables add and
    remove theirs at any time (`_table_drifted` compares the elements, theirs included)."""
    return re.sub(r"\n\s*elements = \{[^}]*\}", "", listing)


def _disposable_matches(ws: Workstation, config: KeeperConfig) -> bool:
    """Whether a running disposable still fits its template in `ws` (same elements)."""
    template_name = config.template or ""
    template = ws.disposable_templates.get(template_name)
    if template is None:
        return False
    if config.host_ifname is None or config.address is None:
        return template.network == NETWORK_NONE
    if template.network == NETWORK_NONE:
        return False
    wanted = disposable_elements(ws, template_name, config.host_ifname, config.address)
    return tuple(wanted.items()) == config.elements


def _disposables_statements(disposables: dict[str, KeeperConfig]) -> str:
    return element_statements([e for config in disposables.values() for e in config.elements])


def _remove_compartment(paths: RuntimePaths, net: HostNetwork, name: str, purge: bool) -> list[str]:
    changes = []
    if _stop(paths, name):
        changes.append(f"{name}: stopped (no longer in the spec)")
    if net.remove_link(names.host_ifname(name)):
        changes.append(f"{name}: removed its link {names.host_ifname(name)}")
    if net.remove_netns(name):
        changes.append(f"{name}: removed its network namespace {net.netns(name)}")
    if purge and paths.state_dir(name).exists():
        btrfs.remove_tree(paths.state_dir(name))
        changes.append(f"{name}: purged its state {paths.state_dir(name)}")
    return changes


def apply(paths: RuntimePaths, loaded: LoadedSpec, *, purge: bool = False) -> ApplyResult:
    """Bring this host to the spec; what changed (nothing on a second run)."""
    require_root()
    ws = loaded.workstation
    artifacts = compile_spec(loaded)
    net = network_for(paths)
    changes: list[str] = []
    notes = [f"policy {warning.render()}" for warning in openings.for_spec(loaded).warnings]
    hostowner.require_host_network(paths, net)  # before anything of this instance is made
    _ensure_root(paths.state_root)
    warnings = []
    if any(c.persistence != "disposable" for c in ws.compartments.values()):
        at_rest = storage.state_root_warning(paths.state_root)
        warnings += [at_rest] if at_rest else []
    with locked(paths):
        previous = live_workstation(paths)
        applied = _read_json(paths.applied_file)
        applied_before = dict(applied)

        disposables = _running_disposables(paths)
        for name, config in sorted(disposables.items()):
            if not _disposable_matches(ws, config):
                _stop(paths, name)
                teardown_network(config)
                del disposables[name]
                changes.append(f"{name}: stopped (its template {config.template} changed)")
        leftover = set(previous.compartments) if previous else set()
        leftover |= set(net.list_netns()) | set(_run_names(paths))
        for name in sorted(leftover - set(ws.compartments) - set(disposables)):
            changes += _remove_compartment(paths, net, name, purge)

        # The filter before anything can forward: one transaction, all or nothing.
        transaction, resolved = table_transaction(ws, artifacts.files[RULESET].decode(), net)
        listing = net.table_listing()
        if (
            listing is None
            or not hostowner.marked_by(paths, table_comment(listing))
            or applied.get("nft_sha256") != _sha256(transaction)
            or applied.get("nft_listing_sha256") != _sha256(_table_shape(listing))
            or _table_drifted(net, transaction + _disposables_statements(disposables))
        ):
            # Running disposables keep their elements across the reload.
            net.load_table(
                transaction + _disposables_statements(disposables),
                comment=hostowner.owner_mark(paths),
            )
            atomic_write(paths.nft_transaction_file, transaction.encode(), 0o600)
            listing = net.table_listing() or ""
            changes.append(f"loaded nft table {TABLE} (generation {artifacts.generation[:16]})")
        named_sets = hostname_sets(ws)
        unresolved = {(n.compartment, n.hostname) for n in named_sets} - {
            (n.compartment, n.hostname) for n in named_sets if resolved[n.set_name]
        }
        for compartment_name, hostname in sorted(unresolved):
            notes.append(
                f"{compartment_name}: {hostname} resolves to nothing; its firewall rule allows "
                "nothing until an apply finds addresses"
            )

        if net.sysctl(paths.host_netns, "net.ipv4.ip_forward") != "1":
            # Recorded before the change, so that `down` turns it off again even if this
            # apply fails further on.
            applied.setdefault("host_ip_forward_before", "0")
            atomic_write(paths.applied_file, (json.dumps(applied, indent=2) + "\n").encode())
            net.enable_forwarding(paths.host_netns)
            changes.append("enabled IPv4 forwarding on the host")

        for compartment in network_order(ws):
            name = compartment.name
            if net.ensure_netns(name):
                changes.append(f"{name}: network namespace {net.netns(name)}")
            uplink = uplink_of(ws, compartment)
            if uplink is None:
                if net.remove_link(names.host_ifname(name)):
                    changes.append(f"{name}: removed its link (network is none)")
                continue
            if net.ensure_link(name, uplink):
                via = "" if uplink.net is None else f", routed through {compartment.network}"
                changes.append(
                    f"{name}: link {uplink.host_ifname} {uplink.link.gateway} <-> "
                    f"{uplink.link.address}/31{via}"
                )
            if compartment.provides_network and net.ensure_net_compartment(
                name, uplink.host_ifname
            ):
                changes.append(f"{name}: forwards and masquerades for its clients")
        for name in _net_tables_drifted(net, ws):
            net.replace_net_compartment_table(name)
            changes.append(f"{name}: its masquerade table put back as the generation has it")

        for compartment in ws.compartments.values():
            if compartment.persistence == "disposable":
                continue
            identity = host_identity(ws, compartment.name)
            if _ensure_state_dirs(paths, compartment.name, identity):
                changes.append(
                    f"{compartment.name}: state folder {paths.home(compartment.name)} "
                    f"(owner {identity.uid})"
                )

        if not _holds_exactly(paths.generation_dir, artifacts.files):
            replace_tree(paths.generation_dir, artifacts.files)
            changes.append(f"live generation {artifacts.generation[:16]}")
        record = {
            **applied,
            "generation": artifacts.generation,
            "nft_sha256": _sha256(transaction),
            "nft_listing_sha256": _sha256(_table_shape(listing)),
            "resolved": resolved,
        }
        if record != applied_before:
            atomic_write(paths.applied_file, (json.dumps(record, indent=2) + "\n").encode())

        for compartment in ws.compartments.values():
            if not compartment.autostart:
                continue
            if _start(paths, ws, compartment.name):
                changes.append(f"{compartment.name}: started")
        write_pool_file(paths, ws)
        changes += fill_pools(paths, ws)
    return ApplyResult(artifacts.generation, tuple(changes), tuple(notes), tuple(warnings))


# ---- down and gc ------------------------------------------------------------------------------


def _stray_cgroups(paths: RuntimePaths, keep: set[str]) -> list[str]:
    prefix = paths.netns_prefix
    return [
        name[len(prefix) :]
        for name in cgroups.names()
        if name.startswith(prefix) and name[len(prefix) :] not in keep
    ]


def down(paths: RuntimePaths) -> list[str]:
    """Stop every compartment and remove all of qnix's runtime from the host; keep the state."""
    require_root()
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    changes: list[str] = []
    had_run_root = paths.run_root.exists()
    with locked(paths):
        applied = _read_json(paths.applied_file)
        for name in _run_names(paths):
            if _stop(paths, name):
                changes.append(f"{name}: stopped")
        for name in net.list_netns():
            net.remove_link(names.host_ifname(name))
            net.remove_netns(name)
            changes.append(f"{name}: removed its network namespace {net.netns(name)}")
        for link in net.list_links():
            net.remove_link(link)
            changes.append(f"removed link {link}")
        for interface in net.list_rule_interfaces():
            net.remove_link(interface)
            changes.append(f"removed the routing rule of {interface}")
        if net.delete_table():
            changes.append(f"removed nft table {TABLE}")
        if applied.get("host_ip_forward_before") == "0":
            net.set_sysctl(paths.host_netns, "net.ipv4.ip_forward", "0")
            changes.append("turned IPv4 forwarding on the host off again")
        for name in _stray_cgroups(paths, set()):
            _cleanup_run(paths, name)
            changes.append(f"{name}: removed its cgroup")
        # Only what qnix puts there: a run root named by mistake (`--run-root /tmp`) keeps
        # everything else, and is removed itself only when nothing else is left in it.
        for entry in RUN_ROOT_ENTRIES:
            path = paths.run_root / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        try:
            paths.run_root.rmdir()  # (the lock above made it, if it was not there)
            if had_run_root:
                changes.append(f"removed {paths.run_root}")
        except OSError:
            changes.append(f"kept {paths.run_root}: it holds files qnix did not put there")
    return changes


def gc(paths: RuntimePaths) -> list[str]:
    """Remove what a crash left: run folders and cgroups without a keeper, namespaces, links,
    rules and nft elements of compartments neither live nor running, the table without a
    generation. qnix mounts nothing on the host (bubblewrap's mounts live and die in the
    compartment's own mount namespace), so there are no mounts to remove."""
    require_root()
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    changes: list[str] = []
    with locked(paths):
        ws = live_workstation(paths)
        live = set(ws.compartments) if ws is not None else set()
        running = {name for name in _run_names(paths) if running_state(paths, name) is not None}
        for name in sorted(set(_run_names(paths)) - running):
            if _cleanup_run(paths, name):
                changes.append(f"{name}: removed what its crashed run left (cgroup, run folder)")
        for name in _stray_cgroups(paths, running):
            if _cleanup_run(paths, name):
                changes.append(f"{name}: removed its cgroup")
        for name in sorted(set(net.list_netns()) - live - running):
            net.remove_link(names.host_ifname(name))
            net.remove_netns(name)
            changes.append(f"{name}: removed its network namespace {net.netns(name)}")
        wanted_links = set()
        if ws is not None:
            wanted_links = {
                names.host_ifname(c.name)
                for c in ws.compartments.values()
                if c.network != NETWORK_NONE
            }
        wanted_links |= {names.host_ifname(name) for name in running}
        for link in sorted(set(net.list_links()) - wanted_links):
            net.remove_link(link)
            changes.append(f"removed link {link}")
        existing = set(net.list_links())
        for interface in sorted(set(net.list_rule_interfaces()) - existing):
            net.remove_link(interface)
            changes.append(f"removed the routing rule of {interface}")
        for claim in sorted(paths.pool_root.glob("*/*.sock")):
            if claim.stem not in running:
                claim.unlink(missing_ok=True)
                changes.append(f"removed the claim socket of {claim.stem}")
        from qnix.runtime.state import remove_leftovers

        changes += remove_leftovers(paths)  # unfinished snapshots and restores
        if ws is None and net.delete_table():
            changes.append(f"removed nft table {TABLE} (no live generation)")
        listing = net.table_listing() if ws is not None else None
        # Elements name interfaces: one that belongs to nothing live is a crashed disposable's.
        stale = set(re.findall(r'"(qx[0-9a-f]{10})" \. ', listing or "")) - wanted_links
        if stale and paths.nft_transaction_file.exists():
            kept = _disposables_statements(_running_disposables(paths))
            statements = paths.nft_transaction_file.read_text() + kept
            net.load_table(statements, comment=hostowner.owner_mark(paths))
            changes.append(f"removed the nft elements of {', '.join(sorted(stale))}")
    return changes
