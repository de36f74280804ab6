"""The life of one compartment: start, stop, restart, and a command run in it.

`start` hands a compartment to a keeper process (qnix.runtime.keeper, started as KEEPER_MAIN)
and returns once its agent answers; `stop` asks the keeper to end it and waits (and takes a
snapshot of its state); `run` goes through the agent (qnix.runtime.quickrun), starting the
compartment first like `qvm-run`. Every start, stop and run is recorded through
qnix.audit.events.record.

Every isolation level starts: namespace (bubblewrap), container (systemd-nspawn) and vm
(QEMU); see qnix.runtime.backends.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qnix.audit import events
from qnix.compile import names
from qnix.errors import QnixError
from qnix.runtime import cgroups, hostowner, secrets, vmlink
from qnix.runtime.backends import container, vm
from qnix.runtime.backends.namespace import HostIdentity
from qnix.runtime.files import atomic_write
from qnix.runtime.keeper import last_lines, teardown_network
from qnix.runtime.live import (
    KEEPER_MAIN,
    READY_TIMEOUT,
    KeeperConfig,
    agent_interpreter,
    await_started,
    compartment_of,
    ensure_dir,
    ensure_root,
    ensure_state_dirs,
    host_identity,
    locked,
    network_for,
    read_keeper_config,
    require_live,
    resolv_conf,
    running_disposables,
)
from qnix.runtime.net import (
    require_root,
)
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.quickrun import (
    compositor_socket,
    execute,
    keeper_alive,
    read_state,
    running_state,
)
from qnix.runtime.state import remember_recipient, snapshot_after_stop
from qnix.spec.model import NETWORK_NONE, Compartment, Workstation

STOP_TIMEOUT = 15.0


def cleanup_run(paths: RuntimePaths, name: str) -> bool:
    """Remove what a run of `name` leaves when its keeper is gone: cgroup, run folder, and
    for a disposable its network. A keeper still starting is waited for, never cut short."""
    await_started(paths, name)
    if running_state(paths, name) is not None:
        return False
    changed = False
    config = read_keeper_config(paths, name)
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


def keeper_config(
    paths: RuntimePaths,
    ws: Workstation,
    compartment: Compartment,
    identity: HostIdentity,
    **disposable: Any,
) -> KeeperConfig:
    interpreter, prefix = agent_interpreter()
    name = compartment.name
    # A disposable's compositor: the one of the `qnix dispose` that asked the spawner.
    requested = disposable.pop("compositor", None)
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
        wayland_display=(requested or compositor_socket(dict(os.environ)))
        if compartment.gui
        else None,
        fullscreen=compartment.fullscreen,
        **secrets.keeper_fields(paths, ws, compartment),
        **disposable,
        **guest,
    )


def read_line(fd: int, timeout: float) -> str:
    """The first line a starting process says on `fd` (stripped), or what came with
    "(no answer in time)"."""
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


def spawn_keeper(paths: RuntimePaths, config: KeeperConfig) -> None:
    name = config.name
    atomic_write(paths.keeper_config(name), config.to_json(), 0o600)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    log = os.open(paths.keeper_log(name), flags, 0o600)
    ready_read, ready_write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", KEEPER_MAIN, str(paths.keeper_config(name))],
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
        answer = read_line(ready_read, READY_TIMEOUT + 15)
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
    cleanup_run(paths, name)
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


def start_locked(paths: RuntimePaths, ws: Workstation, name: str) -> bool:
    """Start `name` unless it runs; True if it was started. The caller holds the lock."""
    compartment = compartment_of(ws, name)
    if running_state(paths, name) is not None:
        return False
    hostowner.require_host_network(paths, network_for(paths))
    cleanup_run(paths, name)  # whatever a crash left
    if not paths.netns_path(name).exists():
        raise QnixError(
            f"compartment {name} has no network namespace", hint="bring the host up: qnix apply"
        )
    identity = host_identity(ws, name)
    if compartment.persistence != "disposable":
        ensure_state_dirs(paths, name, identity)
        if not paths.recipient_file.exists():
            remember_recipient(paths)  # so that its stop can snapshot without the identity
    ensure_root(paths.run_root)
    ensure_dir(paths.compartments_run, 0o711)
    ensure_dir(paths.run_dir(name), 0o711)
    try:
        spawn_keeper(paths, keeper_config(paths, ws, compartment, identity))
    except QnixError as exc:
        cleanup_run(paths, name)  # refused before any keeper (e.g. no age identity): no trace
        events.record(paths, "start", compartment=name, result=f"error: {exc.message}")
        raise
    events.record(paths, "start", compartment=name, result="ok")
    return True


def _wait_gone(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


def end_process(pidfd: int, timeout: float) -> None:
    """SIGTERM to the process, SIGKILL if it is still there after `timeout`; through its
    pidfd, so that no other process that reused the pid is hit."""
    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    if not _wait_gone(pidfd, timeout):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_gone(pidfd, timeout)


def stop_locked(
    paths: RuntimePaths, name: str, timeout: float = STOP_TIMEOUT, *, audit: bool = True
) -> bool:
    """Stop `name` if it runs; True if it ran. Leftovers of a crashed run are removed too."""
    await_started(paths, name)
    state = read_state(paths, name)
    if state is None or not keeper_alive(state):
        cleanup_run(paths, name)
        return False
    try:
        pidfd = os.pidfd_open(state["keeper_pid"])
    except ProcessLookupError:
        cleanup_run(paths, name)
        return False
    try:
        if keeper_alive(state):
            end_process(pidfd, timeout)
    finally:
        os.close(pidfd)
    cleanup_run(paths, name)
    if audit:
        events.record(paths, "stop", compartment=name, result="ok")
    snapshot_after_stop(paths, name)  # never raises: a failure is an audit event and a warning
    return True


def start(paths: RuntimePaths, name: str) -> bool:
    require_root()
    with locked(paths):
        return start_locked(paths, require_live(paths), name)


def stop(paths: RuntimePaths, name: str) -> bool:
    require_root()
    with locked(paths):
        ws = require_live(paths)
        if name not in running_disposables(paths):
            compartment_of(ws, name)
        return stop_locked(paths, name)


def restart(paths: RuntimePaths, name: str) -> None:
    require_root()
    with locked(paths):
        ws = require_live(paths)
        compartment_of(ws, name)
        stop_locked(paths, name)
        start_locked(paths, ws, name)


def check_gui_host(environ: dict[str, str]) -> None:
    """A GUI app needs a Wayland compositor here; X11 is refused, not half-supported."""
    if compositor_socket(environ) is not None:
        return
    if environ.get("DISPLAY"):
        raise QnixError(
            "X11 apps are not supported: qnix shows GUI compartments through Wayland only"
            " (DISPLAY is set, but there is no Wayland compositor)",
            hint="run a Wayland session (sway, Hyprland, GNOME or KDE on Wayland); see docs/gui.md",
        )
    raise QnixError(
        "no Wayland compositor found for a GUI app",
        hint="run from your Wayland session (WAYLAND_DISPLAY set; keep it through sudo with"
        " --preserve-env=WAYLAND_DISPLAY,XDG_RUNTIME_DIR), or set"
        " QNIX_WAYLAND_DISPLAY=/run/user/UID/wayland-0",
    )


# A GUI app waits, as a shell inside, until the host has moved it into its scope, and only
# then becomes the app: nothing it starts can be left behind in the compartment's own cgroup.
# It waits for the scope's own name (app-<its pid inside>, as cgroups.scope is called), not
# for any change: the host may move it before the shell has read where it started.
WAIT_FOR_SCOPE = (
    "scoped() { while IFS= read -r line; do case $line in */app-$$) return 0;; esac; done"
    ' < /proc/self/cgroup; return 1; }; until scoped; do sleep 0.01; done; exec "$@"'
)


def run_gui_app(
    paths: RuntimePaths,
    name: str,
    state: dict[str, Any],
    argv: Sequence[str],
    *,
    event: str = "run",
    **audit: events.FieldValue,
) -> int:
    """argv in a cgroup scope of its own inside the compartment's (app-<pid inside>); in a
    VM, under waypipe's server (the guest's processes are not the host's to move). Audited as
    `event` with `audit`, as quickrun.execute audits."""
    fields: dict[str, Any] = dict(audit)  # execute's own keywords are not among them
    if state.get("isolation") == vm.ISOLATION:
        try:
            return execute(paths, name, state, vmlink.gui_argv(argv), event=event, **fields)
        except Exception as exc:
            raise QnixError(f"cannot run in {name}: {exc}") from exc
    tree = container.cgroup_tree(cgroups.cgroup_of(str(state["cgroup"]), cgroups.detect()))
    scopes: list[Path] = []

    def into_scope(untrusted_pid: int) -> None:
        scopes.append(cgroups.scope(tree, f"app-{untrusted_pid}", untrusted_pid))

    try:
        return execute(
            paths,
            name,
            state,
            ["/bin/sh", "-c", WAIT_FOR_SCOPE, "sh", *argv],
            event=event,
            on_started=into_scope,
            **fields,
        )
    except Exception as exc:
        raise QnixError(f"cannot run in {name}: {exc}") from exc
    finally:
        for folder in scopes:  # what the app left running keeps it until the compartment ends
            with contextlib.suppress(OSError):
                folder.rmdir()


def run(
    paths: RuntimePaths,
    name: str,
    argv: Sequence[str],
    user: str | None = None,
    *,
    gui: bool = False,
) -> int:
    """Run argv in `name` with our stdio (starting it first if needed); its exit code. With
    `gui`, the compartment must have `gui = true` and a display (its Wayland filter)."""
    ws = require_live(paths)
    state = running_state(paths, name)
    if name in ws.compartments or state is None or name not in running_disposables(paths):
        compartment = compartment_of(ws, name)
        inside, has_gui = compartment.user, compartment.gui
    else:
        inside, has_gui = str(state["user"]), bool(state.get("gui"))  # a running disposable
    if gui:
        if not has_gui:
            raise QnixError(
                f"compartment {name} has no GUI",
                hint=f"set gui = true for {name} (or its disposable template) and apply",
            )
        check_gui_host(dict(os.environ))
    if user is not None and user != inside:
        raise QnixError(
            f"compartment {name} has one user, {inside!r}; there is no {user!r} inside",
            hint=f"leave out --user, or pass --user {inside}",
        )
    if state is None:
        require_root()
        with locked(paths):
            start_locked(paths, ws, name)
        state = running_state(paths, name)
        if state is None:
            raise QnixError(f"compartment {name} stopped right after it started")
    if gui and not state.get("gui"):
        raise QnixError(
            f"compartment {name} runs without a display: there was no Wayland compositor when"
            " it started",
            hint=f"qnix restart {name} from your Wayland session",
        )
    if gui:
        return run_gui_app(paths, name, state, argv)
    try:
        return execute(paths, name, state, argv)
    except Exception as exc:
        raise QnixError(f"cannot run in {name}: {exc}") from exc
