"""The keeper: one process per running compartment, detached from the command that started it.

`qnix start` writes a KeeperConfig to `<run root>/compartments/<name>/keeper.json` and runs
`python -I -m qnix.broker.keeper_main <that file>` in a session of its own: this module's
`main` with the broker's call server beside it (composed above the runtime, which imports
nothing of the broker). The keeper

1. creates the compartment's cgroup (memory and process limits),
2. starts bubblewrap (for `isolation = "container"`: systemd-nspawn, see
   qnix.runtime.backends.container) in the compartment's network namespace and cgroup, as the
   compartment's own unprivileged host user, with the agent as the first program: the agent's
   code and /etc/resolv.conf come in as sealed memfds (read-only inside), the agent's socket
   is bound by the keeper in the run folder and handed to the agent as a descriptor (no host
   folder is writable from inside),
3. waits for the agent's "ready", writes `state.json` atomically (its own pid and start time,
   the socket, the environment for commands) and tells the starting command on its stdout
   ("ready", or "error: ..." and exit code 1),
4. waits until the sandbox ends or it is told to stop (SIGTERM, SIGINT, SIGHUP) or, for a
   disposable, the `qnix dispose` that owns it exits: then it sends SIGTERM to every process
   of the compartment, SIGKILL after a grace period, removes the cgroup and the compartment's
   run folder (for a disposable also its nft elements, link and namespace), and exits.

A compartment on the spec's overlay also gets nebula in its network namespace, started before
the sandbox and ended after it (qnix.runtime.nebula).

bubblewrap runs with --die-with-parent (systemd-nspawn and a container's first process with a
parent-death signal): if the keeper is killed outright (SIGKILL), the compartment dies with it,
and `qnix gc` removes the cgroup and files it leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from qnix.errors import QnixError
from qnix.runner import require_tool
from qnix.runtime import agent, bytecode, cgroups, nebula, secrets, vmlink, waylandproxy
from qnix.runtime.backends import container, vm
from qnix.runtime.backends import namespace as ns
from qnix.runtime.files import atomic_write
from qnix.runtime.live import KEEPER_MAIN, READY_TIMEOUT, KeeperConfig, live_workstation
from qnix.runtime.net import COMPARTMENT_IFNAME, HostNetwork
from qnix.runtime.paths import CALL_DIR_INSIDE, CALL_SOCKET_NAME, RuntimePaths, call_dir
from qnix.runtime.quickrun import process_start_time

# Where the agent's code appears inside a compartment (a read-only file): bytecode compiled by
# the interpreter that runs it (qnix.runtime.bytecode), so no start compiles its source.
AGENT_CODE_INSIDE = "/opt/qnix-agent/agent.pyc"
AGENT_SOURCE = Path(__file__).with_name("agent.py")
# The other programs that run inside (qnix/inside/*.py), bound next to the agent.
INSIDE_PROGRAMS_DIR = Path(__file__).parent.parent / "inside"
INSIDE_DIR = "/opt/qnix-agent"
# A GUI compartment's display inside: the filter's socket in the user's runtime folder.
RUNTIME_DIR_INSIDE = "/run/user/1000"
GUI_DISPLAY = "wayland-0"
# A GUI VM's display on the host: a folder of the compartment's host uid in its run folder,
# where the host's `waypipe client` binds its socket (waypipe binds it itself).
WAYPIPE_FOLDER = "waypipe"
WAYPIPE_SOCKET = "client"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def teardown_network(config: KeeperConfig) -> None:
    """A disposable's own network: its nft elements, its link, its namespace."""
    if not config.disposable:
        return
    net = HostNetwork(prefix=config.netns_prefix, host_netns=config.host_netns)
    net.delete_elements(config.elements)
    if config.host_ifname is not None:
        net.remove_link(config.host_ifname)
    net.remove_netns(config.name)


def compartment_env(plan: ns.SandboxPlan) -> dict[str, str]:
    """The environment a command run through the agent gets (what bubblewrap gives the agent)."""
    return {
        "HOME": plan.home_inside,
        "USER": plan.user,
        "LOGNAME": plan.user,
        "SHELL": "/bin/sh",
        "PATH": ns.DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": plan.runtime_dir,
        **dict(plan.env),
    }


def gui_binds(config: KeeperConfig) -> tuple[tuple[str, str], ...]:
    """A GUI compartment's one display: its Wayland filter's socket, read-only (a socket is
    connectable on a read-only mount; nothing inside can replace it)."""
    if config.wayland_display is None:
        return ()
    folder = Path(config.run_dir) / waylandproxy.FOLDER_NAME
    return ((str(folder / waylandproxy.SOCKET_NAME), f"{RUNTIME_DIR_INSIDE}/{GUI_DISPLAY}"),)


def gui_env(config: KeeperConfig) -> tuple[tuple[str, str], ...]:
    """A VM's commands get none: its GUI apps run under waypipe's server, which gives each app
    the display it makes."""
    if config.wayland_display is None or config.isolation == vm.ISOLATION:
        return ()
    return (("WAYLAND_DISPLAY", GUI_DISPLAY),)


def _start_gui(config: KeeperConfig, stop: _Stop) -> subprocess.Popen[bytes] | None:
    """The compartment's Wayland filter, started before the compartment and ended after it."""
    if config.wayland_display is None:
        return None
    process = waylandproxy.start(
        Path(config.run_dir),
        config.wayland_display,
        config.name,
        fullscreen=config.fullscreen,
        host_gid=config.host_gid,
    )
    try:
        _wait_line(process, stop, b"ready\n", READY_TIMEOUT, "the Wayland filter")
    except BaseException:
        _end_gui(process)
        raise
    return process


def _end_gui(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _start_overlay(config: KeeperConfig) -> nebula.Running | None:
    """The compartment's overlay identity (nebula in its network namespace), if the live
    generation gives it one; started before the compartment, ended after it."""
    if config.template is not None:  # a disposable has no identity of its own
        return None
    paths = config.runtime_paths()
    ws = live_workstation(paths)
    if ws is None:
        return None
    return nebula.start_for(paths, ws, config.name, Path(config.run_dir), config.netns_path)


class _Stop:
    """Set by a stop signal; the wakeup pipe makes a waiting select() return."""

    def __init__(self) -> None:
        self.requested = False
        self.wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.requested = True


Hook = Callable[[], object]


class _Beside:
    """`work` in a thread of its own, beside what this one does; `wait` joins it and raises
    what it raised."""

    def __init__(self, work: Hook) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="qnix-beside")
        self._thread.start()

    def _run(self, work: Hook) -> None:
        try:
            work()
        except BaseException as exc:  # handed to the waiting thread
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _start(
    config: KeeperConfig, cgroup: cgroups.Cgroup, stop: _Stop, while_starting: Hook
) -> subprocess.Popen[bytes]:
    # Bound here, where only root can change the folder, and listened on by the agent (so
    # SO_PEERCRED names the compartment's uid): the host never looks for the socket in a
    # place the compartment can write, and nothing the compartment writes lands in the run
    # root.
    listener = agent.bound_socket(config.agent_socket)
    try:
        return _start_with(config, cgroup, stop, listener.fileno(), while_starting)
    finally:
        listener.close()  # the agent (a VM's relay) holds its own copy


def _start_with(
    config: KeeperConfig,
    cgroup: cgroups.Cgroup,
    stop: _Stop,
    listen_fd: int,
    while_starting: Hook,
) -> subprocess.Popen[bytes]:
    plan = ns.SandboxPlan(
        name=config.name,
        home=Path(config.home) if config.home is not None else None,
        user=config.user,
        # The call socket's folder is root's and read-only inside: not replaceable from there.
        extra_ro_binds=((str(call_dir(config.run_dir)), CALL_DIR_INSIDE), *gui_binds(config)),
        env=gui_env(config),
    )
    agent_code = AGENT_SOURCE.read_bytes()
    if config.isolation != vm.ISOLATION:  # a VM's guest runs vmlink, compiled into its archive
        run_root = config.runtime_paths().run_root
        agent_code = bytecode.cached_bytecode(
            config.interpreter, agent_code, AGENT_CODE_INSIDE, run_root
        )
    agent_fd = ns.sealed_memfd(agent_code, "qnix-agent")
    resolv_fd = ns.sealed_memfd(config.resolv_conf.encode(), "qnix-resolv.conf")
    programs = {
        f"{INSIDE_DIR}/{source.name}": ns.sealed_memfd(source.read_bytes(), f"qnix-{source.stem}")
        for source in sorted(INSIDE_PROGRAMS_DIR.glob("[!_]*.py"))
    }
    secret_fds: dict[str, int] = {}
    starting: _Beside | None = None
    try:
        # Decrypted into sealed memfds; bubblewrap copies each into the sandbox's tmpfs.
        secret_fds = secrets.decrypt_all(config.secrets, config.age_identity)
        if config.isolation == vm.ISOLATION:
            while_starting()  # the VM's tap goes into a namespace whose link is there
            process = _start_vm(config, cgroup, stop, plan, listen_fd, secret_fds)
            return _started(config, plan, process)
        system = (
            *ns.host_system_binds(interpreter_prefix=config.interpreter_prefix),
            ns.RoData(agent_fd, AGENT_CODE_INSIDE),
            *(ns.RoData(fd, inside) for inside, fd in programs.items()),
            ns.RoData(resolv_fd, "/etc/resolv.conf"),
            *(
                ns.RoData(fd, secrets.inside_path(name), secrets.SECRET_MODE)
                for name, fd in secret_fds.items()
            ),
        )

        def agent_command(fd: int) -> list[str]:
            return [config.interpreter, "-I", "-S", AGENT_CODE_INSIDE, "serve", str(fd)]

        # Beside the sandbox's start (a disposable's link: the kernel's work on it overlaps
        # the wait for the new process's cgroup, its exec and its agent's interpreter). The
        # child forked meanwhile runs only system calls before its exec, no Python lock.
        starting = _Beside(while_starting)

        if config.isolation == container.ISOLATION:
            # nspawn takes no descriptors but socket activation's: its launcher copies these
            # into a private tmpfs, and the socket arrives as the first LISTEN_FDS one.
            prepared_container = container.prepare(
                plan,
                agent_command(container.LISTEN_FDS_START),
                staging=Path(config.run_dir) / container.STAGING_NAME,
                host_uid=config.host_uid,
                machine=config.cgroup,
                system=ns.host_system_binds(interpreter_prefix=config.interpreter_prefix),
                files={AGENT_CODE_INSIDE: agent_fd, "/etc/resolv.conf": resolv_fd, **programs},
                secret_files=secret_fds,
                init_interpreter=config.interpreter,
            )
            process = container.launch(
                prepared_container,
                netns_path=config.netns_path,
                cgroup=cgroup,
                listen_fd=listen_fd,
                stdout=subprocess.PIPE,
            )
        else:
            with ns.prepare(plan, agent_command(listen_fd), system=system) as prepared:
                process = ns.launch(
                    prepared.argv,
                    netns_path=config.netns_path,
                    cgroup=cgroup,
                    pass_fds=(
                        *prepared.fds,
                        listen_fd,  # bubblewrap passes it on to the agent as it is
                        agent_fd,
                        resolv_fd,
                        *programs.values(),
                        *secret_fds.values(),
                    ),
                    run_as=ns.HostIdentity(config.host_uid, config.host_gid),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=None,  # the keeper's own stderr: its log file
                )
    except BaseException:
        if starting is not None:  # done before the caller takes down what it made
            with contextlib.suppress(BaseException):
                starting.wait()
        raise
    finally:
        for fd in (agent_fd, resolv_fd, *programs.values(), *secret_fds.values()):
            os.close(fd)
    try:
        starting.wait()
        _wait_line(process, stop, b"ready\n", READY_TIMEOUT, "the agent")
        if config.isolation == container.ISOLATION:
            container.forbid_user_namespaces(process.pid)  # before any command can run
    except BaseException:
        _end(process, cgroup, grace=0)
        raise
    return _started(config, plan, process)


def _started(
    config: KeeperConfig,
    plan: ns.SandboxPlan,
    process: subprocess.Popen[bytes],
) -> subprocess.Popen[bytes]:
    """Record the running compartment in its state.json."""
    state = {
        "name": config.name,
        "keeper_pid": os.getpid(),
        "keeper_start": process_start_time(os.getpid()),
        "sandbox_pid": process.pid,
        "socket": config.agent_socket,
        "host_uid": config.host_uid,
        "user": config.user,
        "env": compartment_env(plan),
        "cwd": plan.home_inside,
        "cgroup": config.cgroup,
        "gui": config.wayland_display is not None,
        "isolation": config.isolation,  # a VM's GUI apps run under waypipe, without scopes
        "started": time.time(),
    }
    atomic_write(Path(config.state_file), (json.dumps(state, indent=2) + "\n").encode(), 0o600)
    return process


def _start_vm(
    config: KeeperConfig,
    cgroup: cgroups.Cgroup,
    stop: _Stop,
    plan: ns.SandboxPlan,
    listen_fd: int,
    secret_fds: dict[str, int],
) -> subprocess.Popen[bytes]:
    """QEMU, and the relay (as the compartment's host uid) on the other end of its agent port,
    started side by side: the relay's interpreter starts while the guest boots. Both in the
    compartment's cgroup. Returns QEMU once the guest's agent has said hello."""
    networked = config.guest_address is not None
    if networked:
        vm.connect_tap(Path(config.netns_path).name, COMPARTMENT_IFNAME, config.host_uid)
    kernel = vm.find_kernel()
    run_root = config.runtime_paths().run_root
    accel = vm.accelerator(run_root / vm.ACCEL_FILE, kernel)
    # The same for every start (qnix's programs, busybox, the kernel's modules): cached.
    programs = {
        vm.VMLINK_INSIDE: Path(vmlink.__file__).read_bytes(),
        **{
            f"{INSIDE_DIR}/{source.name}": source.read_bytes()
            for source in sorted(INSIDE_PROGRAMS_DIR.glob("[!_]*.py"))
        },
    }
    base = vm.cached_base_initramfs(
        kernel, programs, config.interpreter, run_root / vm.BASE_CACHE_DIR
    )
    # This start's own, secrets too: only ever in the sealed memfd.
    files = {
        vm.CONFIG_INSIDE: vm.guest_config(
            uid=config.host_uid,
            user=config.user,
            home=plan.home_inside,
            home_share=config.home is not None,
            hostname=config.name,
            address=config.guest_address,
            gateway=config.guest_gateway,
            runtime_dir=plan.runtime_dir,
            gui=config.wayland_display is not None,
        ),
        vm.INTERPRETER_FILE: (config.interpreter + "\n").encode(),
        vm.PREFIX_FILE: ((config.interpreter_prefix or "") + "\n").encode(),
        "/etc/resolv.conf": config.resolv_conf.encode(),
        **({vm.NIX_STORE_MARK: b""} if vm.NIX_STORE.is_dir() else {}),
    }
    secret_files = {
        secrets.inside_path(name): secrets.read_fd(fd) for name, fd in secret_fds.items()
    }
    initrd = ns.sealed_memfd(
        base + vm.start_initramfs(files, secret_files, config.host_uid), "qnix-initramfs"
    )
    # The agent port: a socket pair, one end QEMU's chardev, the other the relay's; nothing
    # of it in a file system, and neither waits for the other to start.
    qemu_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        waypipe = _start_waypipe(config, cgroup)  # ended with the cgroup, on every path
        machine = vm.VmPlan(
            name=config.name,
            memory_mb=config.memory_bytes >> 20,
            cpus=config.cpus,
            host_uid=config.host_uid,
            host_gid=config.host_gid,
            home=config.home,
            interpreter_prefix=config.interpreter_prefix,
            port_fd=qemu_end.fileno(),
            console_log=str(Path(config.run_dir) / vm.CONSOLE_LOG),
            networked=networked,
            mac=vm.mac_address(config.name),
        )
        qemu = ns.launch(
            vm.qemu_argv(machine, kernel, initrd, accel),
            netns_path=config.netns_path,
            cgroup=cgroup,
            pass_fds=(initrd, qemu_end.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,  # the keeper's log
        )
        # The relay ends QEMU (and a GUI VM's waypipe client) with itself.
        with_relay = [qemu] if waypipe is None else [qemu, waypipe[0]]
        pidfds = [os.pidfd_open(process.pid) for process in with_relay]
        try:
            relay = ns.launch(
                [
                    *(sys.executable, "-I", "-m", "qnix.runtime.backends.vm_relay"),
                    *(str(listen_fd), str(relay_end.fileno())),
                    ",".join(str(pidfd) for pidfd in pidfds),
                    str(call_dir(config.run_dir) / CALL_SOCKET_NAME),
                    *(str(config.host_uid), str(config.host_gid)),  # it drops to them itself
                    "" if waypipe is None else str(waypipe[1]),
                ],
                netns_path=None,
                cgroup=cgroup,
                pass_fds=(listen_fd, relay_end.fileno(), *pidfds),
                stdout=subprocess.PIPE,
            )
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    except BaseException:
        if qemu is not None:
            _end(qemu, cgroup, grace=0)
        raise
    finally:
        # Only QEMU and the relay hold the port now: either one's end is the other's EOF.
        os.close(initrd)
        qemu_end.close()
        relay_end.close()
    try:
        _wait_line(relay, stop, b"ready\n", READY_TIMEOUT, "the VM's agent", also=qemu)
        if waypipe is not None:
            _wait_for_waypipe(*waypipe, stop)
    except BaseException as exc:
        _end(qemu, cgroup, grace=0)
        relay.kill()
        relay.wait()
        if not isinstance(exc, QnixError):
            raise
        console = last_lines(Path(config.run_dir) / vm.CONSOLE_LOG, 5)
        shown = "none" if console is None else " | ".join(console) or "empty"
        raise QnixError(
            f"{exc.message} (QEMU with {accel}; the guest's console: {shown})"
            + (
                f"; if this host's KVM hangs guests, set {vm.ACCEL_ENV}=tcg"
                if accel == "kvm"
                else ""
            )
        ) from None
    return qemu


def _start_waypipe(
    config: KeeperConfig, cgroup: cgroups.Cgroup
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """A GUI VM's display on the host: `waypipe client` as the compartment's host uid, in its
    cgroup and network namespace, with the compartment's Wayland filter as its display. The
    relay joins each stream of the guest's waypipe server to a connection on its socket: the
    guest's windows pass the same filter as any compartment's. It parses what the guest sends,
    so it runs with the guest's own rights on the host, as the relay does."""
    if config.wayland_display is None:
        return None
    folder = Path(config.run_dir) / WAYPIPE_FOLDER
    folder.mkdir(mode=0o700)
    os.chown(folder, config.host_uid, config.host_gid)
    path = folder / WAYPIPE_SOCKET
    display = Path(config.run_dir) / waylandproxy.FOLDER_NAME / waylandproxy.SOCKET_NAME
    argv = [
        require_tool("waypipe", "waypipe"),
        *vmlink.WAYPIPE_OPTIONS,
        *("--socket", str(path), "client"),
    ]
    process = ns.launch(
        argv,
        netns_path=config.netns_path,
        cgroup=cgroup,
        run_as=ns.HostIdentity(config.host_uid, config.host_gid),
        env={"WAYLAND_DISPLAY": str(display), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=None,  # the keeper's log
    )
    return process, path


def _wait_for_waypipe(process: subprocess.Popen[bytes], path: Path, stop: _Stop) -> None:
    """Until the waypipe client listens (it says nothing when it does): its socket is there."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not path.is_socket():
        if process.poll() is not None:
            raise QnixError(
                f"the VM's waypipe client exited with code {process.returncode} before it listened",
                hint="its reason is in the keeper's log",
            )
        if stop.requested:
            raise QnixError("stopped while starting")
        if time.monotonic() > deadline:
            raise QnixError(f"the VM's waypipe client did not listen within {READY_TIMEOUT:g}s")
        time.sleep(0.02)


def last_lines(path: Path, count: int) -> list[str] | None:
    """The last `count` lines of a log (a keeper's, a VM's console); None if unreadable."""
    try:
        return path.read_text(errors="replace").strip().splitlines()[-count:]
    except OSError:
        return None


def _wait_line(
    process: subprocess.Popen[bytes],
    stop: _Stop,
    expected: bytes,
    timeout: float,
    what: str,
    also: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait for `expected` as the first line on `process`'s stdout; fail if it, or `also`
    (a VM's QEMU beside its relay), ends first."""
    assert process.stdout is not None
    out = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QnixError(f"{what} did not report ready within {timeout:g}s")
        if stop.requested:
            raise QnixError("stopped while starting")
        if also is not None and also.poll() is not None:
            raise QnixError(f"QEMU exited with code {also.returncode} before {what} was ready")
        tick = remaining if also is None else min(remaining, 0.2)
        readable, _, _ = select.select([out, stop.wakeup_read], [], [], tick)
        if stop.wakeup_read in readable:
            os.read(stop.wakeup_read, 64)
        if out in readable:
            chunk = os.read(out, 64)
            if not chunk:
                code = process.wait()
                raise QnixError(f"{what} exited with code {code} before it was ready")
            line += chunk
    if line != expected:
        raise QnixError(f"unexpected first line from {what}: {line[:80]!r}")


def _end(process: subprocess.Popen[bytes], cgroup: cgroups.Cgroup, grace: float) -> None:
    """SIGTERM to every process of the compartment, SIGKILL to what is left after `grace`."""
    everything = container.cgroup_tree(cgroup)  # with nspawn's sub-cgroups, if any
    if grace > 0 and process.poll() is None:
        for pid in cgroups.processes(everything):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    cgroups.kill(everything)
    process.wait()


def teardown(config: KeeperConfig, cgroup: cgroups.Cgroup | None) -> None:
    """What is per run: the cgroup and the run folder (state, socket, configuration, log);
    for a disposable also its network."""
    if cgroup is not None:
        everything = container.cgroup_tree(cgroup)  # with nspawn's sub-cgroups, if any
        cgroups.kill(everything)
        cgroups.remove(everything)
    if config.claim_socket is not None:  # a preloaded disposable nobody claimed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.claim_socket)
    try:
        if config.isolation == vm.ISOLATION and not config.disposable:
            vm.disconnect_tap(Path(config.netns_path).name, COMPARTMENT_IFNAME)
        teardown_network(config)
    finally:
        shutil.rmtree(config.run_dir, ignore_errors=True)


def listen_for_calls(folder: Path, host_gid: int) -> socket.socket:
    """The call socket in `folder` (created root-owned 0755), connectable by `host_gid` only."""
    folder.mkdir(mode=0o755, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OSError(f"{folder} is not a folder of ours")
    os.chmod(folder, 0o755)  # noqa: S103 - holds only the socket; read-only inside
    path = folder / CALL_SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chown(path, os.geteuid(), host_gid)
    os.chmod(path, 0o660)
    listener.listen(64)
    return listener


def listen_for_claim(path: str) -> socket.socket:
    """The claim socket of a preloaded disposable: only root may connect (0600 in a root
    folder), and the first connection takes it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(8)
    return listener


def _claimed(listener: socket.socket, path: str) -> socket.socket | None:
    """Take the first claim; later ones in the backlog are dropped unanswered (their
    `qnix dispose` tries the next preloaded disposable)."""
    try:
        connection, _ = listener.accept()
    except OSError:
        connection = None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.close()
    if connection is None:
        return None
    try:
        connection.sendall(b"yours\n")
    except OSError:
        connection.close()
        return None
    return connection


def _wait(
    process: subprocess.Popen[bytes],
    stop: _Stop,
    owner: int | None,
    claim: tuple[socket.socket, str] | None = None,
) -> None:
    """Until the sandbox exits, a stop signal arrives, the owner (a pidfd) exits, or — for a
    preloaded disposable — the `qnix dispose` that claimed it closes its connection."""
    pidfd = os.pidfd_open(process.pid)
    listener = claim[0] if claim is not None else None
    connection: socket.socket | None = None
    try:
        while not stop.requested:
            watched = [pidfd, stop.wakeup_read]
            watched += [owner] if owner is not None else []
            watched += [listener.fileno()] if listener is not None else []
            watched += [connection.fileno()] if connection is not None else []
            readable, _, _ = select.select(watched, [], [])
            if stop.wakeup_read in readable:
                os.read(stop.wakeup_read, 64)
            if pidfd in readable:
                return
            if owner is not None and owner in readable:
                stop.requested = True
            if connection is not None and connection.fileno() in readable:
                stop.requested = True  # closed (or spoke out of turn): the owner is done
            if listener is not None and claim is not None and listener.fileno() in readable:
                connection = _claimed(listener, claim[1])
                listener = None
                if connection is None:  # the claimer went away at once: nobody owns it now
                    stop.requested = True
    finally:
        os.close(pidfd)
        if listener is not None:
            listener.close()
        if connection is not None:
            connection.close()


# What the layer above runs beside a compartment: the call server (qnix.broker.calls), handed
# the call socket, the runtime paths, the compartment's name and host uid.
ServeCalls = Callable[[socket.socket, RuntimePaths, str, int], object]


def keep(
    config: KeeperConfig,
    notify: int,
    serve_calls: ServeCalls | None = None,
    *,
    owner: int | None = None,
    while_starting: Hook = lambda: None,
    on_ready: Hook = lambda: None,
) -> int:
    """Run the compartment until it ends or is stopped; report readiness on `notify` (after
    `on_ready`). `serve_calls` answers the compartment's calls (None: it can make none).
    `owner`: a descriptor that turns readable when the compartment's owner is gone (the
    connection of the `qnix dispose` it serves); else config.owner_pid, if any.
    `while_starting` runs once the sandbox is on its way, before its agent answers (the
    spawner sets a disposable's link up then); a failure there ends the start."""
    stop = _Stop()
    cgroup: cgroups.Cgroup | None = None
    gui: subprocess.Popen[bytes] | None = None
    overlay: nebula.Running | None = None
    try:
        if owner is None and config.owner_pid is not None:
            owner = os.pidfd_open(config.owner_pid)
        memory = config.memory_bytes
        if config.isolation == vm.ISOLATION:  # QEMU itself beside the guest's memory
            memory += vm.QEMU_OVERHEAD_BYTES
        limits = cgroups.CgroupLimits(memory_bytes=memory, pids=config.pids)
        cgroup = cgroups.create(config.cgroup, limits)
        # The call socket exists before the sandbox binds its folder; calls are answered
        # once the compartment runs.
        call_listener = listen_for_calls(call_dir(config.run_dir), config.host_gid)
        gui = _start_gui(config, stop)
        overlay = _start_overlay(config)
        process = _start(config, cgroup, stop, while_starting)
        if serve_calls is None:
            call_listener.close()  # nobody answers: a call finds no socket and fails at once
            os.unlink(call_dir(config.run_dir) / CALL_SOCKET_NAME)
        else:
            serve_calls(call_listener, config.runtime_paths(), config.name, config.host_uid)
        claim = None
        if config.claim_socket is not None:
            claim = (listen_for_claim(config.claim_socket), config.claim_socket)
    except BaseException as exc:
        message = exc.message if isinstance(exc, QnixError) else f"{type(exc).__name__}: {exc}"
        print(f"keeper: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            os.write(notify, f"error: {message}\n".encode())
        _end_gui(gui)
        nebula.end(overlay)
        teardown(config, cgroup)
        return 1
    on_ready()
    with contextlib.suppress(OSError):  # the starting command may be gone already
        os.write(notify, b"ready\n")
    os.close(notify)
    try:
        _wait(process, stop, owner, claim)
    finally:
        _end(process, cgroup, grace=config.stop_grace if stop.requested else 0)
        _end_gui(gui)
        nebula.end(overlay)
        teardown(config, cgroup)
    return 0


def main(argv: list[str], serve_calls: ServeCalls | None = None) -> int:
    """The keeper's process (see KEEPER_MAIN: the layer above composes it)."""
    if len(argv) != 2:
        print(f"usage: python -m {KEEPER_MAIN} KEEPER_JSON", file=sys.stderr)
        return 2
    config = KeeperConfig.from_json(Path(argv[1]).read_bytes())
    # Readiness goes to our stdout (a pipe the starting command reads), then stdout is
    # pointed at /dev/null so that nothing later can block on a reader that has gone.
    notify = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return keep(config, notify, serve_calls)
