"""Escape attempts from inside a container compartment (`isolation = "container"`), each run
twice.

Protected: the attempt runs in a real container compartment through `qnix run`, on a stand-in
host (tests/runtime/livehost.py) whose spec also has a namespace compartment, `peer`; it must
fail. Control: the same probe where the protection is absent, and there it must succeed, so
that each test can fail and shows which layer does the work: in a container launched from the
same command line qnix builds (container.prepare + launch) with the named option taken out or
changed or a bind added, or on the host itself.

Controls never harm the host: system calls that would change it get arguments the kernel refuses
after the point the filter guards (see probes.SYSCALL_ATTEMPTS_BODY); a container launched as
host root still has a pid, mount, uts and ipc namespace of its own and its root tree in the
launcher's private tmpfs; /usr is written only through a scratch folder bound over /usr/local
inside such a container; network attempts run in namespaces the test made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from qnix.compile import names
from qnix.compile.inputs import load
from qnix.runtime import cgroups, live
from qnix.runtime.backends import container
from qnix.runtime.backends import namespace as ns
from tests.conftest import need
from tests.isolation import probes
from tests.isolation.conftest import Netns
from tests.netprobes import PROBE, SERVE, server, stop_servers
from tests.runtime.livehost import QNIX, LiveHost

SUBNET = "10.214.0.0/16"
HOST_PORT, PEER_PORT = 8011, 8012
MEMORY_MB, PIDS = 128, 48
SPEC = f"""\
[host]
hostname = "lab"
subnet = "{SUBNET}"

[compartments.box]
isolation = "container"
network = "uplink"
autostart = true
memory_mb = {MEMORY_MB}
pids = {PIDS}
snapshots = 0
# Everything on these ports, anywhere: only the table keeps the host and the peer out of reach.
firewall = [{{ proto = "tcp", cidr = "0.0.0.0/0", ports = [{HOST_PORT}, {PEER_PORT}] }}]

[compartments.peer]
network = "uplink"
autostart = true
memory_mb = 128
snapshots = 0
"""
PYTHON, PYTHON_PREFIX = live.agent_interpreter()
# Names of the cgroups and machines this module makes for its weakened containers.
MODULE_TAG = f"qnixtest-cx{secrets.token_hex(3)}"

# ---- editing a systemd-nspawn command line: one token per option, up to "--" ------------------

Edit = Callable[[list[str]], list[str]]


def without(*prefixes: str) -> Edit:
    """Remove each option starting with one of `prefixes` (each must be there)."""

    def edit(options: list[str]) -> list[str]:
        for prefix in prefixes:
            assert any(option.startswith(prefix) for option in options), f"{prefix} not in argv"
        return [o for o in options if not any(o.startswith(p) for p in prefixes)]

    return edit


def swapped(old: str, new: str) -> Edit:
    def edit(options: list[str]) -> list[str]:
        assert old in options, f"{old} not in argv"
        return [new if option == old else option for option in options]

    return edit


def edited(argv: Sequence[str], edits: Sequence[Edit]) -> list[str]:
    end = list(argv).index("--")
    options = list(argv[1:end])
    for edit in edits:
        options = edit(options)
    return [argv[0], *options, *argv[end:]]


# Host root with every capability, no user namespace, no filter at all (SYSTEMD_SECCOMP=0 also
# turns nspawn's own allow-list off): what the container would be without its protections.
PRIVILEGED: tuple[Edit, ...] = (
    without(
        "--private-users=",
        "--private-users-ownership=",
        "--user=",
        "--no-new-privileges=",
        "--system-call-filter=",
    ),
    swapped("--drop-capability=all", "--capability=all"),
)
# The same, but with qnix's deny-list kept.
FILTER_ALONE: tuple[Edit, ...] = (
    without("--private-users=", "--private-users-ownership=", "--user="),
    swapped("--drop-capability=all", "--capability=all"),
)
NO_SECCOMP = {**container.NSPAWN_ENV, "SYSTEMD_SECCOMP": "0"}

# ---- running probes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        lines = self.stdout.strip().splitlines()
        assert lines, f"no report (exit {self.returncode}): {self.stderr}"
        value = json.loads(lines[-1])
        assert isinstance(value, dict)
        return value


def py(source: str, *args: str) -> list[str]:
    return [PYTHON, "-I", "-S", "-c", source, *args]


@dataclass
class Lab:
    host: LiveHost
    netns: Netns
    box_uid: int
    peer_uid: int
    links: dict[str, names.Link]

    def inside(self, source: str, *args: str, input: str | None = None) -> Outcome:
        """The probe in the container compartment `box`, through `qnix run`."""
        result = subprocess.run(
            [QNIX, "run", "box", "--", *py(source, *args)],
            input=input,
            capture_output=True,
            text=True,
            env=self.host.env,
            timeout=60,
            check=False,
        )
        return Outcome(result.returncode, result.stdout, result.stderr)

    def on_host(self, source: str, *args: str) -> Outcome:
        """The probe as host root, in no compartment at all."""
        result = subprocess.run(
            py(source, *args), capture_output=True, text=True, timeout=60, check=False
        )
        return Outcome(result.returncode, result.stdout, result.stderr)

    def weakened(
        self,
        source: str,
        *args: str,
        edits: Sequence[Edit] = (),
        env: Mapping[str, str] = container.NSPAWN_ENV,
        host_uid: int | None = None,
        limits: cgroups.CgroupLimits | None = None,
        binds: Sequence[tuple[str, str]] = (),
        ro_binds: Sequence[tuple[str, str]] = (),
        init: bool = True,
    ) -> Outcome:
        """The probe in a container built as qnix builds box's (its uid, its limits, the same
        system view), with `edits` to the command line and extra binds (which need mount points
        in the tree: they go through the plan), in a network namespace and cgroup of its own."""
        uid = host_uid if host_uid is not None else self.box_uid
        run = self.host.base / f"weakened-{secrets.token_hex(4)}"
        home = run / "home"
        home.mkdir(parents=True)
        os.chown(home, uid, uid)
        home.chmod(0o700)
        plan = ns.SandboxPlan(
            name="box",
            home=home,
            user="user",
            extra_binds=tuple(binds),
            extra_ro_binds=tuple(ro_binds),
        )
        prepared = container.prepare(
            plan,
            py(source, *args),
            staging=run / "staging",
            host_uid=uid,
            machine=f"{MODULE_TAG}-{secrets.token_hex(3)}",
            system=ns.host_system_binds(interpreter_prefix=PYTHON_PREFIX),
            init_interpreter=PYTHON if init else None,
        )
        prepared = replace(prepared, argv=edited(prepared.argv, edits))
        made = cgroups.create(
            f"{MODULE_TAG}-{secrets.token_hex(3)}",
            limits or cgroups.CgroupLimits(MEMORY_MB << 20, PIDS),
        )
        try:
            process = container.launch(
                prepared,
                netns_path=self.netns.make(),
                cgroup=made,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = process.communicate(timeout=60)
        finally:
            everything = container.cgroup_tree(made)
            cgroups.kill(everything)
            cgroups.remove(everything)
        return Outcome(process.returncode, out.decode(errors="replace"), err.decode())

    def apply(self) -> str:
        return self.host.ok("apply", str(self.host.base / "spec.toml"))


@pytest.fixture(scope="module", autouse=True)
def no_cgroup_leftovers() -> Iterator[None]:
    """The suite's check (tests/isolation/conftest.py), for this module's own cgroups only, in
    every hierarchy nspawn uses: other suites may make and remove theirs meanwhile. The stand-in
    host's are checked by LiveHost.close."""
    yield
    left = [name for name in cgroups.names() if name.startswith(MODULE_TAG)]
    for hierarchy in container.systemd_hierarchies():
        folder = hierarchy / cgroups.QNIX_DIR
        if folder.is_dir():
            left += [p.name for p in folder.iterdir() if p.name.startswith(MODULE_TAG)]
    assert not left, f"cgroups left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need("systemd-nspawn")
    host = LiveHost()
    made_netns = Netns()
    servers: list[subprocess.Popen[str]] = []
    try:
        host.ok("apply", str(host.spec(SPEC)))
        ws = load(host.base / "spec.toml").workstation
        made = Lab(
            host,
            made_netns,
            live.host_identity(ws, "box").uid,
            live.host_identity(ws, "peer").uid,
            names.allocate_links(ws.compartments, SUBNET),
        )
        host.ok("run", "peer", "--", "sh", "-c", "echo peer-private > ~/diary")
        in_host = [host.ip, "netns", "exec", host.host_netns, PYTHON, "-c", SERVE]
        servers.append(server([*in_host, f"0.0.0.0:{HOST_PORT}"]))
        in_peer = [QNIX, "run", "peer", "--", "python3", "-c", SERVE, f"0.0.0.0:{PEER_PORT}"]
        servers.append(server(in_peer, env=host.env))
        yield made
    finally:
        stop_servers(servers)
        try:
            host.close()
        finally:
            made_netns.close()


# ---- files ---------------------------------------------------------------------------------------


def test_another_compartments_state_is_out_of_reach(lab: Lab) -> None:
    peer_state = lab.host.paths.state_dir("peer")
    diary = peer_state / "home" / "diary"
    protected = lab.inside(probes.read_files([str(diary), "/srv/peer/home/diary"])).report
    assert protected == {str(diary): "ENOENT", "/srv/peer/home/diary": "ENOENT"}
    # Control 1: bound in, the other compartment's home is still its own uid's, mode 0700.
    command = probes.read_files(["/srv/peer/home/diary"])
    bound = [(str(peer_state), "/srv/peer")]
    assert lab.weakened(command, ro_binds=bound).report == {"/srv/peer/home/diary": "EACCES"}
    # Control 2: bound in and running as the other compartment's uid, the probe reads it.
    control = lab.weakened(command, ro_binds=bound, host_uid=lab.peer_uid).report
    assert control == {"/srv/peer/home/diary": "ok:peer-private\n"}


def test_host_credentials_are_absent(lab: Lab) -> None:
    present = [p for p in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers") if Path(p).exists()]
    assert "/etc/shadow" in present
    command = probes.read_files(present)
    assert lab.inside(command).report == dict.fromkeys(present, "ENOENT")
    control = lab.on_host(command).report
    for path in present:
        assert control[path] == "ok:" + Path(path).read_text()[:200]


def test_usr_cannot_be_written(lab: Lab) -> None:
    command = probes.write_file("/usr/local/qnix-probe", "written")
    assert lab.inside(command).report == {"write": "EROFS"}
    assert not Path("/usr/local/qnix-probe").exists()
    # Control: a folder of the user's bound writable over /usr/local takes the write.
    scratch = lab.host.base / "usr-local"
    scratch.mkdir()
    os.chown(scratch, lab.box_uid, lab.box_uid)
    control = lab.weakened(command, binds=[(str(scratch), "/usr/local")])
    assert control.report == {"write": "ok"}
    assert (scratch / "qnix-probe").read_text() == "written"


def test_the_agent_and_etc_cannot_be_changed(lab: Lab) -> None:
    for path in ("/opt/qnix-agent/agent.pyc", "/etc/passwd", "/etc/resolv.conf"):
        assert lab.inside(probes.write_file(path, "x")).report == {"write": "EROFS"}
    # Control: host root on a writable tree (still the launcher's private tmpfs).
    control = lab.weakened(
        probes.write_file("/etc/passwd", "x"), edits=[*PRIVILEGED, without("--read-only")]
    )
    assert control.report == {"write": "ok"}


def test_device_nodes_cannot_be_made(lab: Lab) -> None:
    command = probes.make_device("/tmp/qnix-null")
    assert lab.inside(command).report == {"mknod": "EPERM"}
    assert lab.weakened(command, edits=PRIVILEGED, env=NO_SECCOMP).report == {"mknod": "ok"}


# ---- system calls --------------------------------------------------------------------------------

# Per attempt in probes.SYSCALL_ATTEMPTS_BODY that the container refuses: what the privileged
# control (host root, every capability, no filter) gets: "ok", or errnos showing the call
# reached the kernel and was judged there (ENOSYS: the kernel lacks the feature).
SYSCALL_CONTROL: dict[str, frozenset[str]] = {
    "kexec_load": frozenset({"EINVAL", "ENOSYS"}),
    "kexec_file_load": frozenset({"EINVAL", "ENOSYS"}),
    "init_module": frozenset({"ENOEXEC", "ENOSYS"}),
    "finit_module": frozenset({"EBADF", "ENOSYS"}),
    "delete_module": frozenset({"ENOENT", "ENOSYS"}),
    "bpf": frozenset({"ok"}),
    "perf_event_open": frozenset({"ok"}),
    "userfaultfd": frozenset({"ok"}),
    "keyctl": frozenset({"ok"}),
    "add_key": frozenset({"ok"}),
    "request_key": frozenset({"ok"}),
    "name_to_handle_at": frozenset({"ok"}),
    "open_by_handle_at": frozenset({"ok"}),
    "mount": frozenset({"ok"}),
    "umount2": frozenset({"ok"}),
    # EINVAL: judged by the kernel (nspawn's mounts inside are shared, which pivot_root refuses).
    "pivot_root": frozenset({"ok", "EINVAL"}),
    "open_tree": frozenset({"ok"}),
    "move_mount": frozenset({"ok"}),
    "fsopen": frozenset({"ok"}),
    "fsmount": frozenset({"ok"}),
    "fspick": frozenset({"ok"}),
    "mount_setattr": frozenset({"ok"}),
    "swapon": frozenset({"ENOENT"}),
    "swapoff": frozenset({"ENOENT"}),
    "reboot": frozenset({"EINVAL"}),
    "acct": frozenset({"ok", "ENOSYS"}),
    "quotactl": frozenset({"ok", "ENOSYS"}),
    "syslog": frozenset({"ok"}),
    "iopl": frozenset({"EINVAL", "ENOSYS"}),
    "ioperm": frozenset({"EINVAL", "ENOSYS"}),
    "settimeofday": frozenset({"EINVAL"}),
    "clock_settime": frozenset({"EINVAL"}),
    "adjtimex": frozenset({"ok"}),
    "clock_adjtime": frozenset({"ok"}),
    "io_uring_setup": frozenset({"ok"}),
}
# Attempts the kernel grants an unprivileged process (perf_event_open: counting itself).
FILTER_IS_THE_ONLY_LAYER = (
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "name_to_handle_at",
    "open_tree",
    "perf_event_open",
    "quotactl",
    "adjtimex",
    "clock_adjtime",
    "io_uring_setup",
)
PROBE_SYSCALLS = (*SYSCALL_CONTROL, "fsconfig", "personality", "vhangup")


@pytest.fixture(scope="module")
def syscall_runs(lab: Lab) -> dict[str, dict[str, str]]:
    numbers = {
        name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in PROBE_SYSCALLS
    }
    command = probes.syscall_attempts(numbers)
    runs = {
        "protected": lab.inside(command),
        # The deny-list alone, for host root with every capability (nspawn's own allow-list
        # lets a process with every capability through to nearly everything).
        "filter_alone": lab.weakened(command, edits=FILTER_ALONE),
        "control": lab.weakened(command, edits=PRIVILEGED, env=NO_SECCOMP),
        # The compartment as it is, but neither nspawn's filter nor ours.
        "without_filter": lab.weakened(
            command, edits=[without("--system-call-filter=")], env=NO_SECCOMP
        ),
    }
    for outcome in runs.values():
        assert outcome.returncode == 0, outcome.stderr
    return {label: outcome.report for label, outcome in runs.items()}


@pytest.mark.parametrize("name", sorted(SYSCALL_CONTROL))
def test_refused_syscall(name: str, syscall_runs: dict[str, dict[str, str]]) -> None:
    assert name in container.DENIED_SYSCALLS
    assert syscall_runs["protected"][name] == "EPERM"
    assert syscall_runs["filter_alone"][name] == "EPERM"
    assert syscall_runs["control"][name] in SYSCALL_CONTROL[name]


def test_calls_an_unprivileged_process_may_make_are_refused_by_the_filter_alone(
    syscall_runs: dict[str, dict[str, str]],
) -> None:
    """The kernel grants these to any process: only the filter keeps them from the
    compartment, and without it the compartment's own user succeeds at them."""
    for name in FILTER_IS_THE_ONLY_LAYER:
        assert syscall_runs["protected"][name] == "EPERM"
        assert syscall_runs["without_filter"][name] == "ok", name


def test_what_differs_from_the_namespace_backend(syscall_runs: dict[str, dict[str, str]]) -> None:
    """personality() is nspawn's to judge (its allow-list lets it through), and the terminal
    ioctls are not filtered: the host's terminal never enters a compartment (docs/backends.md)."""
    protected = syscall_runs["protected"]
    assert protected["personality"] == "ok"
    assert protected["TIOCSTI"] == "ok"  # on the compartment's own pseudo-terminal


def test_the_callers_environment_cannot_turn_the_filter_off(lab: Lab) -> None:
    """nspawn obeys SYSTEMD_SECCOMP=0; the keeper never hands it the caller's environment."""
    numbers = {"keyctl": pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "keyctl")}
    command = probes._program(
        'report({"keyctl": attempt(lambda: sc(NR["keyctl"], 0, -3, 0))})', NR=numbers
    )
    hostile = {**lab.host.env, "SYSTEMD_SECCOMP": "0", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1"}
    restarted = subprocess.run(
        [QNIX, "restart", "box"], env=hostile, capture_output=True, text=True, check=False
    )
    assert restarted.returncode == 0, restarted.stderr
    assert lab.inside(command).report == {"keyctl": "EPERM"}
    # Control: handed to nspawn, the variable does turn every filter off.
    assert lab.weakened(command, env=NO_SECCOMP).report == {"keyctl": "ok"}


# ---- processes -----------------------------------------------------------------------------------


def test_host_processes_are_invisible(
    lab: Lab, marker: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, tag = marker
    command = probes.find_process("sleep", tag)
    assert lab.inside(command).report == {"found": []}
    assert lab.on_host(command).report == {"found": [process.pid]}


def test_host_process_cannot_be_traced_or_signalled(
    lab: Lab, marker: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, _ = marker
    assert lab.inside(probes.ptrace_process(process.pid)).report == {"attach": "EPERM"}
    assert lab.inside(probes.signal_process(process.pid)).report == {"kill": "ESRCH"}
    assert process.poll() is None
    # Control: from the host, the same probes reach it.
    assert lab.on_host(probes.ptrace_process(process.pid)).report == {"attach": "ok"}
    assert lab.on_host(probes.signal_process(process.pid)).report == {"kill": "ok"}
    assert process.wait(timeout=5) == -signal.SIGTERM


DEBUG_CALLS = ("ptrace", "process_vm_readv", "process_vm_writev")
CAP_SYS_PTRACE = 19
# The container as qnix builds it, but keeping CAP_SYS_PTRACE (every other capability still
# dropped): nspawn's own allow-list then admits all three calls, so only qnix's deny-list is
# left to refuse them.
ALLOW_LIST_ADMITS_DEBUGGING = swapped(
    "--drop-capability=all",
    "--drop-capability="
    + ",".join(
        str(number)
        for number in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1)
        if number != CAP_SYS_PTRACE
    ),
)


def not_denied(*calls: str) -> Edit:
    """qnix's deny-list (--system-call-filter=~...) without `calls`, each of which it must
    hold; nspawn's own allow-list stays on."""

    def edit(options: list[str]) -> list[str]:
        prefix = "--system-call-filter=~"
        [denied] = [option for option in options if option.startswith(prefix)]
        names = denied.removeprefix(prefix).split()
        assert set(calls) <= set(names), f"{calls} not all in {denied}"
        kept = prefix + " ".join(name for name in names if name not in calls)
        return [kept if option == denied else option for option in options]

    return edit


def test_own_processes_cannot_be_debugged_either(lab: Lab) -> None:
    """ptrace and process_vm_readv/writev are refused in a container compartment, even on its
    own processes (a namespace compartment allows debuggers). qnix's deny-list refuses all
    three; nspawn's allow-list admits ptrace only with CAP_SYS_PTRACE, which the container does
    not keep, so it refuses ptrace too, but it always admits process_vm_readv/writev."""
    command = probes.debug_own_child()
    refused = dict.fromkeys(DEBUG_CALLS, "EPERM")
    debugged = dict.fromkeys(DEBUG_CALLS, "ok")
    assert lab.inside(command).report == refused
    # qnix's deny-list alone refuses all three where nspawn's allow-list admits them; the
    # control: the same without qnix's three, nspawn's filter still on.
    assert lab.weakened(command, edits=[ALLOW_LIST_ADMITS_DEBUGGING]).report == refused
    control = lab.weakened(command, edits=[ALLOW_LIST_ADMITS_DEBUGGING, not_denied(*DEBUG_CALLS)])
    assert control.report == debugged
    # With the capabilities dropped as in box, nspawn's allow-list refuses ptrace by itself, but
    # without qnix's three the user reads and writes its child's memory.
    without_denial = lab.weakened(command, edits=[not_denied(*DEBUG_CALLS)]).report
    assert without_denial == {**debugged, "ptrace": "EPERM"}


ORPHAN_ZOMBIES = probes._program(
    r"""
import time
child = os.fork()
if child == 0:
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    os._exit(0)  # its child is an orphan now: the kernel hands it to PID 1
os.waitpid(child, 0)
time.sleep(0.8)  # the orphan has ended by now
zombies = 0
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            with open(f"/proc/{entry}/stat") as handle:
                zombies += handle.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            pass
report({"zombies": zombies})
"""
)


def test_orphans_are_reaped(lab: Lab) -> None:
    """A zombie nobody reaps holds a pid of the compartment's limit until the container ends."""
    assert lab.inside(ORPHAN_ZOMBIES).report == {"zombies": 0}
    # Control: without qnix's init the probe itself is PID 1, and reaps nothing it did not start.
    assert lab.weakened(ORPHAN_ZOMBIES, init=False).report == {"zombies": 1}


def test_nested_user_namespaces_are_refused(lab: Lab) -> None:
    command = probes.nested_user_namespace()
    assert lab.inside(command).report == {"unshare": "ENOSPC"}
    # Control: the same container without the keeper's max_user_namespaces = 0.
    assert lab.weakened(command).report == {"unshare": "ok"}


# ---- names, time, network ------------------------------------------------------------------------


def test_hostname_cannot_be_changed(lab: Lab) -> None:
    command = probes.set_hostname("pwned")
    assert lab.inside(command).report == {"sethostname": "EPERM", "now": "box"}
    control = lab.weakened(command, edits=PRIVILEGED, env=NO_SECCOMP).report
    assert control == {"sethostname": "ok", "now": "pwned"}
    assert socket.gethostname() != "pwned"  # the container's own uts namespace


def test_raw_sockets_are_refused(lab: Lab) -> None:
    command = probes.packet_socket()
    assert lab.inside(command).report == {"socket": "EPERM"}
    assert lab.weakened(command, edits=PRIVILEGED, env=NO_SECCOMP).report == {"socket": "ok"}


def test_neither_the_host_nor_another_compartment_is_reachable(lab: Lab) -> None:
    box, peer = lab.links["box"], lab.links["peer"]
    targets = [[box.gateway, HOST_PORT], [peer.address, PEER_PORT]]

    def probe() -> list[str]:
        outcome = lab.inside(PROBE, json.dumps(targets))
        assert outcome.returncode == 0, outcome.stderr
        answers: list[str] = json.loads(outcome.stdout)
        return answers

    # box's firewall allows both ports anywhere; the table still keeps it to itself.
    assert probe() == ["timeout", "timeout"]
    # Control: without the table, the host and the peer answer.
    lab.host.nft("delete", "table", "inet", "qnix")
    try:
        assert probe() == [f"ok {box.address}", f"ok {box.address}"]
    finally:
        assert lab.apply().splitlines()[0].startswith("loaded nft table inet qnix")
    assert probe() == ["timeout", "timeout"]


# ---- limits --------------------------------------------------------------------------------------


def test_memory_limit_holds(lab: Lab) -> None:
    command = probes.allocate(2 * MEMORY_MB)
    protected = lab.inside(command)
    assert protected.stdout == "started\n"  # it ran, and was killed allocating
    assert protected.returncode == 128 + signal.SIGKILL
    assert lab.host.ok("run", "box", "--", "true") == ""  # the compartment lives on
    control = lab.weakened(command, limits=cgroups.CgroupLimits(4 * MEMORY_MB << 20, PIDS))
    assert control.report == {"allocated": 2 * MEMORY_MB}


def test_process_limit_holds(lab: Lab) -> None:
    command = probes.fork_many(2 * PIDS)
    protected = lab.inside(command).report
    assert protected["error"] == "EAGAIN"
    assert protected["forked"] < PIDS
    control = lab.weakened(command, limits=cgroups.CgroupLimits(MEMORY_MB << 20, 4 * PIDS))
    assert control.report == {"forked": 2 * PIDS, "error": None}


def test_own_limits_cannot_be_raised(lab: Lab) -> None:
    limit = cgroups.detect().hierarchy("pids").mount / cgroups.QNIX_DIR
    limit = limit / lab.host.paths.cgroup_name("box") / "pids.max"
    command = probes.write_cgroup_file(str(limit), "100000")
    assert lab.inside(command).report == {"write": "ENOENT"}
    assert limit.read_text() == f"{PIDS}\n"
    control = lab.on_host(command)
    assert control.report == {"write": "ok"}
    limit.write_text(str(PIDS))
