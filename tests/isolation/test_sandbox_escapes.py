"""Escape and leak attempts from inside a namespace compartment, each run twice.

Protected: the probe runs exactly as qnix runs a compartment (prepare + launch in a network
namespace of its own) and the attempt must fail. Control: the same command line with the named
protection taken out, and the attempt must succeed, so that each test can fail and shows which
layer does the work. Where several layers stop an attempt, the control removes all of them and
extra runs show the layers one at a time.

Controls never harm the host: system calls that would change it get arguments the kernel refuses
after the point the filter guards (kexec with 17 segments, reboot with a wrong magic, swapon on
a missing file, a clock that cannot be set); mounts happen in the sandbox's own mount namespace;
/usr is written through an overlay in a throw-away mount namespace; hostnames and SysV IPC are
changed inside a throw-away uts/ipc namespace standing in for the host; network attempts run in
network namespaces made for the test.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyseccomp
import pytest

from qnix.runtime import cgroups
from qnix.runtime.backends import namespace as ns
from tests.conftest import need
from tests.isolation import probes
from tests.isolation.conftest import (
    CAPS_KEPT,
    PRIVILEGED,
    Cgroups,
    Edit,
    Netns,
    Sandbox,
    append,
    apply,
    drop,
    drop_group,
    plan,
    py,
    replace,
    unique,
)

# ---- the seccomp layer ---------------------------------------------------------------------------

# Per attempt in probes.SYSCALL_ATTEMPTS_BODY: what a privileged control (host root, every
# capability, no filter) gets. "ok" where the attempt really succeeds; otherwise the errnos that
# show the call reached the kernel and was judged there (ENOSYS: the kernel lacks the feature).
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
    "pivot_root": frozenset({"ok"}),
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
    "vhangup": frozenset({"ok"}),
    "iopl": frozenset({"EINVAL", "ENOSYS"}),
    "ioperm": frozenset({"EINVAL", "ENOSYS"}),
    "settimeofday": frozenset({"EINVAL"}),
    "clock_settime": frozenset({"EINVAL"}),
    "adjtimex": frozenset({"ok"}),
    "clock_adjtime": frozenset({"ok"}),
    "personality": frozenset({"ok"}),
    "io_uring_setup": frozenset({"ok"}),
    "TIOCSTI": frozenset({"ok"}),
    "TIOCLINUX": frozenset({"ENOTTY", "EINVAL"}),
}
# Attempts the kernel grants any unprivileged process: in a compartment the filter is the only
# thing in their way, so the compartment without its filter must succeed at them.
FILTER_IS_THE_ONLY_LAYER = frozenset(
    {
        "userfaultfd",
        "keyctl",
        "add_key",
        "request_key",
        "name_to_handle_at",
        "open_tree",
        "personality",
        "adjtimex",
        "clock_adjtime",
    }
)
PROBE_SYSCALLS = (
    *(name for name in SYSCALL_CONTROL if not name.startswith("TIOC")),
    "fsconfig",
)


@pytest.fixture(scope="module")
def syscall_runs(sandbox: Sandbox) -> dict[str, dict[str, str]]:
    numbers = {
        name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in PROBE_SYSCALLS
    }
    command = py(probes.syscall_attempts(numbers))
    runs = {
        "protected": sandbox.run(command),
        # The filter alone, for a process that is host root with every capability.
        "filter_alone": sandbox.run(command, edits=PRIVILEGED),
        "control": sandbox.run(command, edits=PRIVILEGED, seccomp=False),
        "compartment_without_filter": sandbox.run(command, seccomp=False),
    }
    for outcome in runs.values():
        assert outcome.returncode == 0, outcome.stderr
    return {label: outcome.report for label, outcome in runs.items()}


def test_every_syscall_attempt_was_made(syscall_runs: dict[str, dict[str, str]]) -> None:
    for report in syscall_runs.values():
        assert set(report) == set(SYSCALL_CONTROL)


@pytest.mark.parametrize("name", sorted(SYSCALL_CONTROL))
def test_refused_syscall(name: str, syscall_runs: dict[str, dict[str, str]]) -> None:
    assert syscall_runs["protected"][name] == "EPERM"
    assert syscall_runs["filter_alone"][name] == "EPERM"
    assert syscall_runs["control"][name] in SYSCALL_CONTROL[name]
    if name in FILTER_IS_THE_ONLY_LAYER:
        assert syscall_runs["compartment_without_filter"][name] == "ok"


def test_foreign_abi_call_kills_the_process(sandbox: Sandbox) -> None:
    """keyctl through the ia32 `int 0x80` entry: a filter for x86_64 only would miss it."""
    command = py(probes.ia32_keyctl())
    protected = sandbox.run(command)
    assert protected.stdout == "started\n"
    assert protected.returncode == 128 + signal.SIGSYS  # bubblewrap's pid 1 reports the signal
    control = sandbox.run(command, seccomp=False)
    assert control.returncode == 0, control.stderr
    assert control.report["keyctl"] > 0  # a keyring serial number


# ---- processes -----------------------------------------------------------------------------------


def test_host_processes_are_invisible(
    sandbox: Sandbox, marker: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, tag = marker
    command = py(probes.find_process("sleep", tag))
    assert sandbox.run(command).report == {"found": []}
    control = sandbox.run(command, edits=[drop("--unshare-pid")])
    assert control.report == {"found": [process.pid]}


def test_host_process_cannot_be_signalled(
    sandbox: Sandbox, marker: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, _ = marker
    command = py(probes.signal_process(process.pid))
    assert sandbox.run(command).report == {"kill": "ESRCH"}
    assert process.poll() is None
    # Without the pid namespace: bubblewrap ran as root here, so the compartment's user maps to
    # root outside and may signal root's processes (qnix runs compartments as their own user).
    assert sandbox.run(command, edits=[drop("--unshare-pid")]).report == {"kill": "ok"}
    assert process.wait(timeout=5) == -signal.SIGTERM


def test_host_process_cannot_be_traced(
    sandbox: Sandbox, marker: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, _ = marker
    command = py(probes.ptrace_process(process.pid))
    assert sandbox.run(command).report == {"attach": "ESRCH"}
    # Named but in another user namespace and without capabilities: still refused.
    assert sandbox.run(command, edits=[drop("--unshare-pid")]).report == {"attach": "EPERM"}
    control = sandbox.run(command, edits=[*PRIVILEGED, drop("--unshare-pid")])
    assert control.report == {"attach": "ok"}  # the filter is still loaded: it allows ptrace
    assert process.poll() is None  # detached again, alive


def test_host_root_is_not_reachable_through_proc(
    sandbox: Sandbox, marker: tuple[subprocess.Popen[bytes], str], host_dir: Path
) -> None:
    process, _ = marker
    secret = host_dir / "proc-root" / "secret"
    secret.parent.mkdir()
    secret.write_text("host-root-secret")
    command = py(probes.read_files([f"/proc/{process.pid}/root{secret}"]))
    assert list(sandbox.run(command).report.values()) == ["ENOENT"]
    assert list(sandbox.run(command, edits=[drop("--unshare-pid")]).report.values()) == ["EACCES"]
    control = sandbox.run(command, edits=[*PRIVILEGED, drop("--unshare-pid")])
    assert list(control.report.values()) == ["ok:host-root-secret"]


# ---- files ---------------------------------------------------------------------------------------


def test_host_credentials_in_etc_are_absent(sandbox: Sandbox) -> None:
    wanted = ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/machine-id"]
    present = [path for path in wanted if Path(path).exists()]
    assert "/etc/shadow" in present
    command = py(probes.read_files(present))
    assert sandbox.run(command).report == dict.fromkeys(present, "ENOENT")
    control = sandbox.run(command, edits=[append(("--ro-bind", "/etc", "/etc"))])
    for path in present:
        assert control.report[path] == "ok:" + Path(path).read_text()[:200]


def test_generated_passwd_lists_no_host_account(sandbox: Sandbox) -> None:
    command = py(probes.read_files(["/etc/passwd"]))
    inside = sandbox.run(command).report["/etc/passwd"]
    users = [line.split(":")[0] for line in inside.removeprefix("ok:").splitlines()]
    assert users == ["root", "user", "nobody"]
    control = sandbox.run(command, edits=[append(("--ro-bind", "/etc", "/etc"))])
    assert control.report["/etc/passwd"] == "ok:" + Path("/etc/passwd").read_text()[:200]


def test_host_files_outside_the_plan_are_absent(sandbox: Sandbox, host_dir: Path) -> None:
    secret = host_dir / "private" / "secret"
    secret.parent.mkdir()
    secret.write_text("host-private")
    exposed = f"/run/host{secret}"
    command = py(probes.read_files([str(secret), exposed]))
    assert sandbox.run(command).report == {str(secret): "ENOENT", exposed: "ENOENT"}
    # Control: the host's whole file system in view (at /run/host, as some sandboxes expose it).
    control = sandbox.run(command, edits=[append(("--ro-bind", "/", "/run/host"))])
    assert control.report[exposed] == "ok:host-private"


def test_host_tmp_is_not_shared(sandbox: Sandbox) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="qnixtest-", dir="/tmp") as handle:
        handle.write("host-tmp")
        handle.flush()
        command = py(probes.read_files([handle.name]))
        assert sandbox.run(command).report == {handle.name: "ENOENT"}
        shared = replace(("--perms", "1777", "--tmpfs", "/tmp"), ("--bind", "/tmp", "/tmp"))
        assert sandbox.run(command, edits=[shared]).report == {handle.name: "ok:host-tmp"}


class Greeter:
    """Listening sockets that greet every connection; the stand-in for a host service."""

    def __init__(self, sockets: list[socket.socket], greeting: bytes) -> None:
        self.sockets, self.greeting = sockets, greeting
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for sock in self.sockets:
            sock.settimeout(0.05)
        while not self.stop.is_set():
            for sock in self.sockets:
                try:
                    connection, _ = sock.accept()
                except TimeoutError:
                    continue
                with connection:
                    connection.sendall(self.greeting)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def test_host_daemon_sockets_in_run_are_unreachable(sandbox: Sandbox) -> None:
    directory = Path(tempfile.mkdtemp(prefix="qnixtest-", dir="/run"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / "daemon.sock"))
    listener.listen()
    greeter = Greeter([listener], b"host-daemon")
    try:
        command = py(probes.connect({"daemon": str(directory / "daemon.sock")}))
        assert sandbox.run(command).report == {"daemon": "ENOENT"}
        shared = [
            replace(("--perms", "0755", "--tmpfs", "/run"), ("--ro-bind", "/run", "/run")),
            drop_group(("--perms", "0700", "--dir", "/run/user/1000")),
        ]
        assert sandbox.run(command, edits=shared).report == {"daemon": "ok:host-daemon"}
    finally:
        greeter.close()
        shutil.rmtree(directory)


def test_host_shared_memory_files_are_absent(sandbox: Sandbox) -> None:
    path = Path("/dev/shm") / unique("shm")
    path.write_text("host-shm")
    try:
        command = py(probes.read_files([str(path)]))
        assert sandbox.run(command).report == {str(path): "ENOENT"}
        host_dev = replace(("--dev", "/dev"), ("--dev-bind", "/dev", "/dev"))
        assert sandbox.run(command, edits=[host_dev]).report == {str(path): "ok:host-shm"}
    finally:
        path.unlink()


def test_other_compartment_state_is_absent(sandbox: Sandbox, host_dir: Path) -> None:
    state = host_dir / "state"
    homes = {name: state / name / "home" for name in ("alpha", "beta")}
    for home in homes.values():
        home.mkdir(parents=True)
    alpha = ns.SandboxPlan(name="alpha", home=homes["alpha"], user="alice")
    beta = ns.SandboxPlan(name="beta", home=homes["beta"], user="bob")
    # alpha keeps a secret in its persistent home...
    written = sandbox.run(
        py(probes.write_file("/home/alice/secret", "alpha-secret")), sandbox=alpha
    )
    assert written.report == {"write": "ok"}
    assert (homes["alpha"] / "secret").read_text() == "alpha-secret"
    # ...which beta cannot find, by host path or by alpha's path inside.
    targets = [str(homes["alpha"] / "secret"), "/home/alice/secret"]
    command = py(probes.read_files(targets))
    assert sandbox.run(command, sandbox=beta).report == dict.fromkeys(targets, "ENOENT")
    control = sandbox.run(
        command, sandbox=beta, edits=[append(("--ro-bind", str(state), str(state)))]
    )
    assert control.report[targets[0]] == "ok:alpha-secret"


OUTER = r"""
import json, subprocess, sys
spec = json.loads(sys.argv[-1])
{setup}
result = subprocess.run(spec["argv"], pass_fds=spec["fds"], capture_output=True, text=True)
lines = result.stdout.strip().splitlines()
inner = json.loads(lines[-1]) if lines else None
report = {{"inner": inner, "returncode": result.returncode, "stderr": result.stderr, {after}}}
print(json.dumps(report))
"""


def outer(unshare_flags: list[str], setup: str, after: str = "") -> list[str]:
    """A host stand-in: a throw-away namespace where `setup` runs, then the sandbox."""
    return [need("unshare"), *unshare_flags, "--", *py(OUTER.format(setup=setup, after=after))]


def test_system_directories_are_read_only(sandbox: Sandbox, host_dir: Path) -> None:
    planted = "/usr/bin/qnix-planted"
    command = py(probes.write_file(planted, "planted"))
    assert sandbox.run(command).report == {"write": "EROFS"}
    # Control: /usr writable, through an overlay whose upper layer catches every write.
    layers = {name: host_dir / "overlay" / name for name in ("upper", "work", "merged")}
    for path in layers.values():
        path.mkdir(parents=True)
    options = f"lowerdir=/usr,upperdir={layers['upper']},workdir={layers['work']}"
    mount = [need("mount"), "-t", "overlay", "overlay", "-o", options, str(layers["merged"])]
    wrapper = outer(
        ["--mount", "--propagation", "private"], f"subprocess.run({mount!r}, check=True)"
    )
    writable = replace(("--ro-bind", "/usr", "/usr"), ("--bind", str(layers["merged"]), "/usr"))
    control = sandbox.run(command, edits=[writable], outer=wrapper).report
    assert control["inner"] == {"write": "ok"}, control
    assert (layers["upper"] / "bin" / "qnix-planted").read_text() == "planted"
    assert not Path(planted).exists()


def test_agent_code_is_read_only(sandbox: Sandbox, host_dir: Path) -> None:
    agent = host_dir / "agent"
    agent.mkdir()
    (agent / "agent.py").write_text("original")
    command = py(probes.write_file("/opt/qnix-agent/agent.py", "tampered"))
    bound = (str(agent), "/opt/qnix-agent")
    protected = sandbox.run(command, sandbox=plan(extra_ro_binds=(bound,)))
    assert protected.report == {"write": "EROFS"}
    assert (agent / "agent.py").read_text() == "original"
    control = sandbox.run(command, sandbox=plan(extra_binds=(bound,)))
    assert control.report == {"write": "ok"}
    assert (agent / "agent.py").read_text() == "tampered"


def test_device_nodes_cannot_be_made(sandbox: Sandbox) -> None:
    command = py(probes.make_device("/dev/qnix-null"))
    assert sandbox.run(command).report == {"mknod": "EPERM"}
    assert sandbox.run(command, edits=PRIVILEGED).report == {"mknod": "ok"}


def test_setuid_root_binary_gives_no_privilege(sandbox: Sandbox, host_dir: Path) -> None:
    """Run as qnix runs a compartment in production: bubblewrap as an unprivileged host user."""
    directory = host_dir / "setuid"
    directory.mkdir()
    binary = directory / "id"
    shutil.copy(need("id"), binary)
    os.chown(binary, 0, 0)
    binary.chmod(0o4755)
    assert binary.stat().st_mode & stat.S_ISUID
    nobody = ns.HostIdentity(65534, 65534)
    system = ns.host_system_binds(interpreter_prefix=None)  # root's pyenv is not nobody's
    bound = plan(extra_ro_binds=((str(directory), "/opt/setuid"),))
    protected = sandbox.run(["/opt/setuid/id", "-u"], sandbox=bound, run_as=nobody, system=system)
    assert (protected.returncode, protected.stdout) == (0, "1000\n"), protected.stderr
    # Control: the same binary for the same host user without the sandbox (no no_new_privs, no
    # user namespace, no nosuid mount) makes it root.
    control = subprocess.run(
        [need("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", str(binary), "-u"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert control.stdout == "0\n"


# ---- descriptors and environment -----------------------------------------------------------------


def test_launcher_descriptors_do_not_leak(sandbox: Sandbox, host_dir: Path) -> None:
    secret = host_dir / "fd-secret"
    secret.write_text("fd-secret")
    fd = os.open(secret, os.O_RDONLY)
    try:
        os.set_inheritable(fd, True)  # even an inheritable descriptor stays outside
        command = py(probes.inherited_fd(fd))
        protected = sandbox.run(command).report
        assert protected["read"] == "EBADF"
        # stdin, stdout, stderr and the probe's own listing of /proc/self/fd: nothing of
        # bubblewrap's (seccomp program, generated files) or the launcher's.
        assert protected["fds"] == [0, 1, 2, 3]
        control = sandbox.run(command, extra_fds=[fd]).report
        assert control["read"] == "ok:fd-secret"
    finally:
        os.close(fd)


def test_launcher_environment_does_not_leak(sandbox: Sandbox) -> None:
    env = {**os.environ, "QNIX_TEST_TOKEN": "host-token"}
    command = py(probes.environment("QNIX_TEST_TOKEN"))
    assert sandbox.run(command, env=env).report == {"value": None}
    assert sandbox.run(command, env=env, edits=[drop("--clearenv")]).report == {
        "value": "host-token"
    }


def test_terminal_input_cannot_be_injected(sandbox: Sandbox) -> None:
    """TIOCSTI on the terminal qnix was started from would type commands into the user's shell."""
    master, slave = pty.openpty()
    setsid = [need("setsid"), "--ctty"]  # the terminal becomes bubblewrap's controlling tty
    command = py(probes.inject_terminal("qnix\n"))

    def run_on_terminal(edits: list[Edit], seccomp: bool) -> str:
        with ns.prepare(plan(), command, with_seccomp=seccomp) as prepared:
            argv = [*setsid, *apply(prepared.argv, edits)]
            process = ns.launch(
                argv,
                netns_path=sandbox.netns_path,
                cgroup=None,
                pass_fds=prepared.fds,
                stdin=slave,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        return str(json.loads(out)["inject"])

    try:
        assert run_on_terminal([], seccomp=True) == "EPERM"
        # Each layer alone: a new session (no controlling terminal) and the filter.
        assert run_on_terminal([], seccomp=False) == "EPERM"
        assert run_on_terminal([drop("--new-session")], seccomp=True) == "EPERM"
        legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
        # Where the kernel still allows TIOCSTI on one's own terminal, an ordinary process can
        # inject; elsewhere only CAP_SYS_ADMIN can, so the control needs it.
        allowed = not legacy.exists() or legacy.read_text().strip() == "1"
        edits = [drop("--new-session")] if allowed else [*PRIVILEGED, drop("--new-session")]
        assert run_on_terminal(edits, seccomp=False) == "ok"
        os.set_blocking(slave, False)
        assert os.read(slave, 100) == b"qnix\n"  # typed into the terminal's input
    finally:
        os.close(master)
        os.close(slave)


# ---- names, namespaces, capabilities -------------------------------------------------------------


def test_hostname_change_does_not_reach_the_host(sandbox: Sandbox) -> None:
    wrapper = outer(
        ["--uts"],
        'import socket\nsocket.sethostname("qnix-outer")',
        '"outer": socket.gethostname()',
    )
    command = py(probes.set_hostname("pwned"))
    protected = sandbox.run(command, outer=wrapper).report
    assert protected["inner"]["sethostname"] == "EPERM"
    assert protected["outer"] == "qnix-outer"
    # The uts namespace alone: host root with every capability changes the name, inside only.
    layered = sandbox.run(command, outer=wrapper, edits=PRIVILEGED).report
    assert layered["inner"] == {"sethostname": "ok", "now": "pwned"}
    assert layered["outer"] == "qnix-outer"
    control = sandbox.run(
        command, outer=wrapper, edits=[*PRIVILEGED, drop("--unshare-uts", "--hostname")]
    ).report
    assert control["inner"]["sethostname"] == "ok"
    assert control["outer"] == "pwned"


def test_host_name_is_not_visible(sandbox: Sandbox) -> None:
    command = py(probes.hostname())
    assert sandbox.run(command).report == {"hostname": "probe"}
    control = sandbox.run(command, edits=[drop("--unshare-uts", "--hostname")])
    assert control.report == {"hostname": socket.gethostname()}


def test_host_sysv_shared_memory_is_invisible(sandbox: Sandbox) -> None:
    key = 0x51A1
    setup = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget({key}, 4096, 0o1600)  # IPC_CREAT, owner only
address = libc.shmat(shmid, None, 0)
ctypes.memmove(address, b"host-shm-segment", 16)
"""
    wrapper = outer(["--ipc"], setup)
    command = py(probes.sysv_shared_memory(key))
    assert sandbox.run(command, outer=wrapper).report["inner"] == {"read": "ENOENT"}
    control = sandbox.run(command, outer=wrapper, edits=[drop("--unshare-ipc")]).report
    assert control["inner"] == {"read": "ok:host-shm-segment"}


def test_nested_user_namespaces_are_refused(sandbox: Sandbox) -> None:
    """A new user namespace would give the compartment every capability over fresh namespaces,
    and with them kernel code (nf_tables, ...) an unprivileged process cannot reach."""
    command = py(probes.nested_user_namespace())
    assert sandbox.run(command).report == {"unshare": "ENOSPC"}
    assert sandbox.run(command, edits=[drop("--disable-userns")]).report == {"unshare": "ok"}


def test_chroot_is_refused(sandbox: Sandbox) -> None:
    command = py(probes.chroot())
    assert sandbox.run(command).report == {"chroot": "EPERM"}
    assert sandbox.run(command, edits=CAPS_KEPT).report == {"chroot": "ok"}


CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def capability_sets(status: str) -> dict[str, int]:
    """The capability sets and no_new_privs of a /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in status.splitlines())
    found = {name: int(fields[name], 16) for name in CAPABILITY_SETS}
    return {**found, "NoNewPrivs": int(fields["NoNewPrivs"])}


def test_no_capability_is_left_in_any_set(sandbox: Sandbox) -> None:
    """Every capability set inside is empty, the bounding set too. Started as qnix starts it
    (as an unprivileged host user), bubblewrap keeps none even without --cap-drop ALL; started
    by root, it keeps the whole bounding set unless told to drop it. No attack needs that set:
    the user holds no capability to use and no_new_privs stops an exec from gaining one. The
    flag is defence in depth for a bubblewrap started otherwise."""
    command = [need("cat"), "/proc/self/status"]
    nothing = {**dict.fromkeys(CAPABILITY_SETS, 0), "NoNewPrivs": 1}
    nobody = ns.HostIdentity(65534, 65534)

    def sets(run_as: ns.HostIdentity | None, edits: Sequence[Edit] = ()) -> dict[str, int]:
        # Without root's pyenv, which nobody cannot enter: cat needs no interpreter.
        system = ns.host_system_binds(interpreter_prefix=None)
        outcome = sandbox.run(command, run_as=run_as, edits=edits, system=system)
        assert outcome.returncode == 0, outcome.stderr
        return capability_sets(outcome.stdout)

    assert sets(run_as=nobody) == nothing
    assert sets(run_as=None) == nothing
    # Control: started by root without the flag, the bounding set is root's own.
    own = capability_sets(Path("/proc/self/status").read_text())["CapBnd"]
    assert own != 0
    assert sets(run_as=None, edits=[drop("--cap-drop")]) == {**nothing, "CapBnd": own}
    # Started as qnix starts it, bubblewrap drops them all by itself.
    assert sets(run_as=nobody, edits=[drop("--cap-drop")]) == nothing


def test_kernel_addresses_are_hidden(sandbox: Sandbox) -> None:
    command = py(probes.kernel_symbols())
    protected = sandbox.run(command).report
    assert protected["seen"] == 50
    assert protected["nonzero"] == 0
    assert sandbox.run(command, edits=PRIVILEGED).report["nonzero"] > 0


def test_packets_cannot_be_captured(sandbox: Sandbox) -> None:
    command = py(probes.packet_socket())
    assert sandbox.run(command).report == {"socket": "EPERM"}
    assert sandbox.run(command, edits=PRIVILEGED).report == {"socket": "ok"}


def test_network_addresses_cannot_be_changed(sandbox: Sandbox, netns: Netns) -> None:
    """Taking another compartment's address would fool every rule that trusts a source address."""
    ip = need("ip")
    path = netns.make()
    command = [ip, "address", "add", "192.0.2.77/32", "dev", "lo"]
    protected = sandbox.run(command, netns_path=path)
    assert protected.returncode != 0
    assert "Operation not permitted" in protected.stderr

    def addresses() -> str:
        name = Path(path).name
        return subprocess.run(
            [ip, "-n", name, "-o", "address", "show", "dev", "lo"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "192.0.2.77" not in addresses()
    control = sandbox.run(command, netns_path=path, edits=PRIVILEGED)
    assert control.returncode == 0, control.stderr
    assert "192.0.2.77/32" in addresses()


@pytest.fixture(scope="module")
def host_standin(netns: Netns) -> Iterator[tuple[str, str, int]]:
    """A network namespace playing the host: loopback up, an abstract unix socket and a TCP
    port on 127.0.0.1 that greet whoever connects. Yields (netns path, abstract name, port)."""
    path = netns.make()
    subprocess.run([need("ip"), "-n", Path(path).name, "link", "set", "lo", "up"], check=True)
    abstract = unique("abstract")
    server = r"""
import socket, sys
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
unix.bind("\0" + sys.argv[1])
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0))
for sock in (unix, tcp):
    sock.listen()
    sock.settimeout(0.05)
print(tcp.getsockname()[1], flush=True)
while True:
    for sock in (unix, tcp):
        try:
            connection, _ = sock.accept()
        except TimeoutError:
            continue
        with connection:
            connection.sendall(b"host-service")
"""
    process = ns.launch(py(server, abstract), netns_path=path, cgroup=None, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield path, abstract, port
    finally:
        process.kill()
        process.wait()


def test_host_abstract_sockets_are_unreachable(
    sandbox: Sandbox, host_standin: tuple[str, str, int]
) -> None:
    """Abstract unix sockets (X11's, D-Bus's, ...) belong to a network namespace."""
    path, abstract, _ = host_standin
    command = py(probes.connect({"abstract": "@" + abstract}))
    assert sandbox.run(command).report == {"abstract": "ECONNREFUSED"}
    control = sandbox.run(command, netns_path=path)
    assert control.report == {"abstract": "ok:host-service"}


def test_host_loopback_services_are_unreachable(
    sandbox: Sandbox, host_standin: tuple[str, str, int]
) -> None:
    path, _, port = host_standin
    command = py(probes.connect({"tcp": ["127.0.0.1", port]}))
    assert sandbox.run(command).report["tcp"] in {"ENETUNREACH", "ECONNREFUSED"}
    assert sandbox.run(command, netns_path=path).report == {"tcp": "ok:host-service"}


# ---- cgroups -------------------------------------------------------------------------------------


def test_cgroup_path_is_hidden(sandbox: Sandbox, cgroup_factory: Cgroups) -> None:
    cgroup = cgroup_factory.make(cgroups.CgroupLimits(256 << 20, 64))
    command = py(probes.own_cgroup())
    lines = sandbox.run(command, cgroup=cgroup).report["lines"]
    assert lines and all(line.endswith(":/") for line in lines)
    control = sandbox.run(command, cgroup=cgroup, edits=[drop("--unshare-cgroup")]).report["lines"]
    assert any(line.endswith(f"/qnix/{cgroup.name}") for line in control)


def test_own_limits_cannot_be_raised(sandbox: Sandbox, cgroup_factory: Cgroups) -> None:
    cgroup = cgroup_factory.make(cgroups.CgroupLimits(256 << 20, 64))
    pids = cgroups.detect().hierarchy("pids")
    limit = pids.mount / cgroups.QNIX_DIR / cgroup.name / "pids.max"
    command = py(probes.write_cgroup_file(str(limit), "100000"))
    assert sandbox.run(command, cgroup=cgroup).report == {"write": "ENOENT"}
    assert limit.read_text() == "64\n"
    cgroupfs = append(("--bind", "/sys/fs/cgroup", "/sys/fs/cgroup"))
    assert sandbox.run(command, cgroup=cgroup, edits=[cgroupfs]).report == {"write": "ok"}
    assert limit.read_text() == "100000\n"


def test_memory_limit_holds(sandbox: Sandbox, cgroup_factory: Cgroups) -> None:
    cgroup = cgroup_factory.make(cgroups.CgroupLimits(64 << 20, 64))
    command = py(probes.allocate(256))
    protected = sandbox.run(command, cgroup=cgroup)
    assert protected.stdout == "started\n"  # it ran, and was killed allocating
    assert protected.returncode == 128 + signal.SIGKILL
    memory = cgroups.detect().hierarchy("memory")
    directory = memory.mount / cgroups.QNIX_DIR / cgroup.name
    events = directory / ("memory.events" if memory.version == 2 else "memory.oom_control")
    assert "oom_kill 1" in events.read_text().splitlines()  # by the cgroup's OOM killer
    control = sandbox.run(command)
    assert control.report == {"allocated": 256}


def test_process_limit_holds(sandbox: Sandbox, cgroup_factory: Cgroups) -> None:
    cgroup = cgroup_factory.make(cgroups.CgroupLimits(256 << 20, 16))
    command = py(probes.fork_many(40))
    protected = sandbox.run(command, cgroup=cgroup).report
    assert protected["error"] == "EAGAIN"
    assert protected["forked"] < 16
    assert sandbox.run(command).report == {"forked": 40, "error": None}
