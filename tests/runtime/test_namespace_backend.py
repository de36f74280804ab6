"""The namespace backend: exact bubblewrap command lines, what the host lends a compartment, plan
validation, and real runs through prepare + launch (namespaces, no_new_privs, netns, cgroup,
unprivileged host user, homes)."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.errors import QnixError
from qnix.runtime import cgroups, seccomp
from qnix.runtime.backends import namespace as ns
from qnix.runtime.backends.namespace import (
    Bind,
    Chdir,
    Dev,
    Dir,
    Hostname,
    Proc,
    RemountRo,
    RoBind,
    RoData,
    SandboxPlan,
    SetEnv,
    Symlink,
    Tmpfs,
)
from qnix.spec.model import COMPARTMENT_NAME_RE, UNIX_USER_RE
from tests.conftest import need
from tests.isolation.conftest import py

SYSTEM = (RoBind("/usr", "/usr"), Symlink("usr/bin", "/bin"), RoBind("/etc/ssl", "/etc/ssl"))
FILE_FDS = {"/etc/passwd": 11, "/etc/group": 12, "/etc/hosts": 13, "/etc/hostname": 14}
NAMESPACES = [
    "/usr/bin/bwrap",
    "--unshare-user",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup",
    "--disable-userns",
]


def test_argv_of_a_persistent_compartment() -> None:
    plan = SandboxPlan(
        name="work",
        home=Path("/var/lib/qnix/work/home"),
        user="alice",
        uid=1001,
        gid=1002,
        extra_ro_binds=(("/opt/qnix", "/opt/qnix"),),
        extra_binds=(("/run/qnix/work", "/run/qnix"),),
        env=(("QNIX_AGENT", "/run/qnix/agent.sock"), ("LANG", "de_DE.UTF-8")),
    )
    argv = ns.bwrap_argv(
        plan,
        ["/opt/qnix/bin/agent", "--serve"],
        seccomp_fd=10,
        file_fds=FILE_FDS,
        system=SYSTEM,
        bwrap="/usr/bin/bwrap",
    )
    assert argv == [
        *NAMESPACES,
        *("--uid", "1001", "--gid", "1002"),
        "--die-with-parent",
        "--new-session",
        *("--cap-drop", "ALL"),
        "--clearenv",
        *("--hostname", "work"),
        *("--setenv", "HOME", "/home/alice"),
        *("--setenv", "USER", "alice"),
        *("--setenv", "LOGNAME", "alice"),
        *("--setenv", "SHELL", "/bin/sh"),
        *("--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin"),
        *("--setenv", "LANG", "C.UTF-8"),
        *("--setenv", "XDG_RUNTIME_DIR", "/run/user/1001"),
        *("--setenv", "QNIX_AGENT", "/run/qnix/agent.sock"),
        *("--setenv", "LANG", "de_DE.UTF-8"),  # the plan's value comes later and wins
        *("--perms", "1777", "--tmpfs", "/tmp"),
        *("--perms", "1777", "--tmpfs", "/var/tmp"),
        *("--perms", "0755", "--tmpfs", "/run"),
        *("--perms", "0700", "--dir", "/run/user/1001"),
        *("--ro-bind", "/usr", "/usr"),
        *("--symlink", "usr/bin", "/bin"),
        *("--ro-bind", "/etc/ssl", "/etc/ssl"),
        *("--perms", "0444", "--ro-bind-data", "12", "/etc/group"),
        *("--perms", "0444", "--ro-bind-data", "14", "/etc/hostname"),
        *("--perms", "0444", "--ro-bind-data", "13", "/etc/hosts"),
        *("--perms", "0444", "--ro-bind-data", "11", "/etc/passwd"),
        *("--proc", "/proc"),
        *("--dev", "/dev"),
        *("--bind", "/var/lib/qnix/work/home", "/home/alice"),
        *("--ro-bind", "/opt/qnix", "/opt/qnix"),
        *("--bind", "/run/qnix/work", "/run/qnix"),
        *("--remount-ro", "/"),
        *("--chdir", "/home/alice"),
        *("--seccomp", "10"),
        "--",
        "/opt/qnix/bin/agent",
        "--serve",
    ]


def test_argv_of_a_disposable_without_filter() -> None:
    plan = SandboxPlan(name="disp-7", home=None, user="user")
    argv = ns.bwrap_argv(plan, ["firefox"], seccomp_fd=None, system=(), bwrap="/usr/bin/bwrap")
    assert argv == [
        *NAMESPACES,
        *("--uid", "1000", "--gid", "1000"),
        "--die-with-parent",
        "--new-session",
        *("--cap-drop", "ALL"),
        "--clearenv",
        *("--hostname", "disp-7"),
        *("--setenv", "HOME", "/home/user"),
        *("--setenv", "USER", "user"),
        *("--setenv", "LOGNAME", "user"),
        *("--setenv", "SHELL", "/bin/sh"),
        *("--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin"),
        *("--setenv", "LANG", "C.UTF-8"),
        *("--setenv", "XDG_RUNTIME_DIR", "/run/user/1000"),
        *("--perms", "1777", "--tmpfs", "/tmp"),
        *("--perms", "1777", "--tmpfs", "/var/tmp"),
        *("--perms", "0755", "--tmpfs", "/run"),
        *("--perms", "0700", "--dir", "/run/user/1000"),
        *("--proc", "/proc"),
        *("--dev", "/dev"),
        *("--perms", "0700", "--tmpfs", "/home/user"),
        *("--remount-ro", "/"),
        *("--chdir", "/home/user"),
        "--",
        "firefox",
    ]


def test_directive_argv() -> None:
    assert RoBind("/a", "/b").argv() == ["--ro-bind", "/a", "/b"]
    assert Bind("/a", "/b").argv() == ["--bind", "/a", "/b"]
    assert Tmpfs("/t").argv() == ["--tmpfs", "/t"]
    assert Tmpfs("/t", mode=0o700, size=1 << 20).argv() == [
        *("--perms", "0700", "--size", "1048576", "--tmpfs", "/t")
    ]
    assert Proc().argv() == ["--proc", "/proc"]
    assert Dev().argv() == ["--dev", "/dev"]
    assert Dir("/d", 0o750).argv() == ["--perms", "0750", "--dir", "/d"]
    assert Symlink("../x", "/y").argv() == ["--symlink", "../x", "/y"]
    assert RoData(7, "/etc/f").argv() == ["--perms", "0444", "--ro-bind-data", "7", "/etc/f"]
    assert RemountRo("/").argv() == ["--remount-ro", "/"]
    assert SetEnv("K", "--bind / /").argv() == ["--setenv", "K", "--bind / /"]
    assert Hostname("work").argv() == ["--hostname", "work"]
    assert Chdir("/home/u").argv() == ["--chdir", "/home/u"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: RoBind("relative", "/x"),
        lambda: Bind("/x", "/a/../b"),
        lambda: Tmpfs("/x/"),
        lambda: Dir("x"),
        lambda: Symlink("", "/x"),
        lambda: Symlink("t", "/x\0"),
        lambda: SetEnv("A=B", "v"),
        lambda: SetEnv("A", "v\0"),
        lambda: Hostname("Work"),
        lambda: Chdir("home").argv(),
        lambda: Proc("proc").argv(),
    ],
)
def test_directives_refuse_bad_values(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Work"},
        {"name": "none-of-this-is-a-valid-name-because-it-is-too-long"},
        {"user": "root"},
        {"user": "al:ice"},
        {"user": "alice\nroot"},
        {"uid": 0},
        {"gid": 65534},
        {"home": Path("relative/home")},
        {"extra_binds": (("/host", "/"),)},
        {"extra_binds": (("/host", "/proc/sys"),)},
        {"extra_ro_binds": (("/host", "/dev/sda"),)},
        {"extra_ro_binds": (("/host", "/etc/passwd"),)},
        {"extra_ro_binds": (("host", "/opt/x"),)},
        {"env": (("A B", "v"),)},
        {"env": (("A\n", "v"),)},  # `$` of a pattern also matches before a final newline
        {"name": "work\n"},
        {"user": "alice\n"},
    ],
)
def test_plan_refuses_bad_values(changes: dict[str, object]) -> None:
    values: dict[str, object] = {"name": "work", "home": None, "user": "alice", **changes}
    with pytest.raises(ValueError):
        SandboxPlan(**values)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_plan_names_are_validated(name: str, user: str) -> None:
    valid = bool(re.fullmatch(COMPARTMENT_NAME_RE, name) and re.fullmatch(UNIX_USER_RE, user))
    if not valid or user == "root":
        with pytest.raises(ValueError):
            SandboxPlan(name=name, home=None, user=user)
        return
    passwd = ns.identity_files(SandboxPlan(name=name, home=None, user=user))["/etc/passwd"]
    # No name can add a line (an account) to passwd.
    assert [line.split(":")[0] for line in passwd.decode().splitlines()] == ["root", user, "nobody"]


def test_no_command_is_an_error() -> None:
    plan = SandboxPlan(name="work", home=None, user="alice")
    with pytest.raises(ValueError, match="command"):
        ns.bwrap_argv(plan, [], seccomp_fd=None, system=())


def test_identity_files() -> None:
    plan = SandboxPlan(name="work", home=None, user="alice", uid=1001, gid=1002)
    assert ns.identity_files(plan) == {
        "/etc/passwd": (
            b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            b"alice:x:1001:1002:alice:/home/alice:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "/etc/group": b"root:x:0:\nalice:x:1002:\nnobody:x:65534:\n",
        "/etc/hosts": b"127.0.0.1\tlocalhost work\n::1\tlocalhost work\n",
        "/etc/hostname": b"work\n",
    }


# ---- what the host lends ------------------------------------------------------------------------


def populate(root: Path, entries: dict[str, str | None]) -> None:
    """entries: relative path -> symlink target, or None for a directory, or "file:" content."""
    for relative, target in entries.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if target is None:
            path.mkdir()
        elif target.startswith("file:"):
            path.write_text(target.removeprefix("file:"))
        else:
            path.symlink_to(target)


SECRETS = {
    "etc/shadow": "file:root:*:",
    "etc/gshadow": "file:root:*:",
    "etc/machine-id": "file:0123",
    "etc/passwd": "file:root:x:0:0",
    "etc/group": "file:root:x:0:",
    "etc/hostname": "file:host",
    "etc/resolv.conf": "file:nameserver 127.0.0.53",
    "etc/sudoers": "file:root ALL=(ALL) ALL",
    "etc/ssh": None,
}


def test_system_binds_merged_usr(tmp_path: Path) -> None:
    populate(
        tmp_path,
        {
            "usr": None,
            "bin": "usr/bin",
            "sbin": "usr/sbin",
            "lib": "usr/lib",
            "lib64": "usr/lib64",
            "etc/ld.so.cache": "file:",
            "etc/ssl": None,
            "etc/localtime": "/usr/share/zoneinfo/Europe/Berlin",
            "etc/nsswitch.conf": "file:passwd: files",
            **SECRETS,
        },
    )
    assert ns.host_system_binds(tmp_path, "/opt/python/3.11") == (
        RoBind(f"{tmp_path}/usr", "/usr"),
        Symlink("usr/bin", "/bin"),
        Symlink("usr/sbin", "/sbin"),
        Symlink("usr/lib", "/lib"),
        Symlink("usr/lib64", "/lib64"),
        RoBind(f"{tmp_path}/etc/ld.so.cache", "/etc/ld.so.cache"),
        Symlink("/usr/share/zoneinfo/Europe/Berlin", "/etc/localtime"),
        RoBind(f"{tmp_path}/etc/nsswitch.conf", "/etc/nsswitch.conf"),
        RoBind(f"{tmp_path}/etc/ssl", "/etc/ssl"),
        RoBind("/opt/python/3.11", "/opt/python/3.11"),
    )


def test_system_binds_split_usr(tmp_path: Path) -> None:
    populate(tmp_path, {"usr": None, "bin": None, "lib": None, "lib32": None, **SECRETS})
    assert ns.host_system_binds(tmp_path, "/usr") == (
        RoBind(f"{tmp_path}/usr", "/usr"),
        RoBind(f"{tmp_path}/bin", "/bin"),
        RoBind(f"{tmp_path}/lib", "/lib"),
        RoBind(f"{tmp_path}/lib32", "/lib32"),
    )


def test_system_binds_nixos(tmp_path: Path) -> None:
    populate(
        tmp_path,
        {
            "usr/bin": None,
            "bin": None,
            "nix/store": None,
            "run/current-system": "/nix/store/aaaa-nixos-system-work-25.11",
            "etc/static": "/nix/store/bbbb-etc/etc",
            "etc/ssl": "/etc/static/ssl",
            "etc/nsswitch.conf": "/etc/static/nsswitch.conf",
            **SECRETS,
        },
    )
    assert ns.host_system_binds(tmp_path, "/nix/store/cccc-python3-3.11.14") == (
        RoBind(f"{tmp_path}/usr", "/usr"),
        RoBind(f"{tmp_path}/bin", "/bin"),
        Symlink("/etc/static/nsswitch.conf", "/etc/nsswitch.conf"),
        Symlink("/etc/static/ssl", "/etc/ssl"),
        Symlink("/nix/store/bbbb-etc/etc", "/etc/static"),
        RoBind(f"{tmp_path}/nix/store", "/nix/store"),
        Symlink("/nix/store/aaaa-nixos-system-work-25.11", "/run/current-system"),
    )


def test_system_binds_of_this_host_leave_out_credentials() -> None:
    found = ns.host_system_binds()
    inside = {d.dst if isinstance(d, RoBind) else d.link for d in found}  # type: ignore[union-attr]
    assert "/usr" in inside
    assert not inside & {f"/etc/{name}" for name in ("shadow", "gshadow", "passwd", "machine-id")}


# ---- file descriptors ---------------------------------------------------------------------------


def test_prepare_hands_over_sealed_descriptors() -> None:
    plan = SandboxPlan(name="work", home=None, user="alice")
    with ns.prepare(plan, ["true"], system=()) as prepared:
        fds = prepared.fds
        argv = prepared.argv
        seccomp_fd = int(argv[argv.index("--seccomp") + 1])
        files = {argv[i + 2]: int(argv[i + 1]) for i, a in enumerate(argv) if a == "--ro-bind-data"}
        assert set(fds) == {seccomp_fd, *files.values()}
        assert os.read(seccomp_fd, 1 << 20) == seccomp.compartment_filter_bpf()
        for path, content in ns.identity_files(plan).items():
            assert os.read(files[path], 1 << 20) == content
            with pytest.raises(PermissionError):
                os.pwrite(files[path], b"x", 0)  # sealed: nobody can change it
    for fd in fds:
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF


# ---- real runs ----------------------------------------------------------------------------------

INSIDE = r"""
import json, os, pwd
lines = open("/proc/self/status").read().splitlines()
status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
def writable(path):
    try:
        with open(path, "w"):
            return "ok"
    except OSError as exc:
        return exc.strerror
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "nnp": status["NoNewPrivs"], "seccomp": status["Seccomp"],
    "capeff": status["CapEff"], "capbnd": status["CapBnd"],
    "hostname": os.uname().nodename, "cwd": os.getcwd(), "env": dict(os.environ),
    "root": writable("/planted"), "tmp": writable("/tmp/file"), "home": writable("./file"),
    "pid": os.getpid(),
}))
"""


@pytest.fixture(scope="module")
def netns_path() -> Iterator[str]:
    ip = need("ip")
    name = f"qnixtest-unit-{secrets.token_hex(3)}"
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run([ip, "netns", "delete", name], check=True)


def run(
    plan: SandboxPlan, command: list[str], netns_path: str, **options: object
) -> subprocess.CompletedProcess[str]:
    with ns.prepare(plan, command, bwrap=need("bwrap"), **options) as prepared:  # type: ignore[arg-type]
        process = ns.launch(
            prepared.argv,
            netns_path=netns_path,
            cgroup=None,
            pass_fds=prepared.fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(
        prepared.argv, process.returncode, out.decode(), err.decode()
    )


def test_a_compartment_runs_as_planned(netns_path: str) -> None:
    plan = SandboxPlan(name="work", home=None, user="alice", env=(("QNIX_AGENT", "1"),))
    result = run(plan, py(INSIDE), netns_path)
    assert result.returncode == 0, result.stderr
    inside = json.loads(result.stdout)
    assert inside == {
        "uid": 1000,
        "gid": 1000,
        "groups": [],
        "user": "alice",
        "nnp": "1",
        "seccomp": "2",
        "capeff": "0000000000000000",
        "capbnd": "0000000000000000",
        "hostname": "work",
        "cwd": "/home/alice",
        "env": {
            "HOME": "/home/alice",
            "USER": "alice",
            "LOGNAME": "alice",
            "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin",
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": "/run/user/1000",
            "QNIX_AGENT": "1",
            "PWD": "/home/alice",
        },
        "root": "Read-only file system",
        "tmp": "ok",
        "home": "ok",
        "pid": 2,  # bubblewrap's reaper is pid 1 of the compartment
    }


def test_hostile_environment_values_arrive_intact(netns_path: str) -> None:
    values = ["--bind / /", "-- /bin/sh", "$(id)", "a\nb", "é中🙂", " ", "'\"\\"]
    plan = SandboxPlan(
        name="work", home=None, user="alice", env=tuple((f"V{i}", v) for i, v in enumerate(values))
    )
    result = run(plan, py("import json, os; print(json.dumps(dict(os.environ)))"), netns_path)
    env = json.loads(result.stdout)
    assert [env[f"V{i}"] for i in range(len(values))] == values


def test_persistent_and_disposable_homes(tmp_path: Path, netns_path: str) -> None:
    write = py("open('note', 'w').write('kept'); print(open('note').read())")
    read = py("import os; print(os.path.exists('note'))")
    persistent = SandboxPlan(name="work", home=tmp_path, user="alice")
    assert run(persistent, write, netns_path).stdout == "kept\n"
    assert (tmp_path / "note").read_text() == "kept"
    assert run(persistent, read, netns_path).stdout == "True\n"
    disposable = SandboxPlan(name="disp-1", home=None, user="alice")
    assert run(disposable, write, netns_path).stdout == "kept\n"
    assert run(disposable, read, netns_path).stdout == "False\n"


def cgroup_paths(proc_self_cgroup: str, host: cgroups.CgroupHost) -> dict[str, str]:
    """Controller -> the cgroup path /proc/<pid>/cgroup gives for it on this host."""
    by_subsystem = {}
    for line in proc_self_cgroup.splitlines():
        _, subsystems, path = line.split(":", 2)
        for subsystem in subsystems.split(",") if subsystems else ["(v2)"]:
            by_subsystem[subsystem] = path
    return {
        c: by_subsystem["(v2)" if host.hierarchy(c).version == 2 else c]
        for c in cgroups.CONTROLLERS
    }


def test_launch_enters_the_netns_and_the_cgroup(netns_path: str) -> None:
    name = f"qnixtest-unit-{secrets.token_hex(3)}"
    cgroup = cgroups.create(name, cgroups.CgroupLimits(64 << 20, 16))
    try:
        report = (
            "import json, os\n"
            "net = os.stat('/proc/self/ns/net').st_ino\n"
            "print(json.dumps([net, open('/proc/self/cgroup').read()]))"
        )
        process = ns.launch(
            py(report), netns_path=netns_path, cgroup=cgroup, stdout=subprocess.PIPE
        )
        inode, membership = json.loads(process.communicate(timeout=30)[0])
        assert inode == os.stat(netns_path).st_ino != os.stat("/proc/self/ns/net").st_ino
        paths = cgroup_paths(membership, cgroups.detect())
        assert paths == dict.fromkeys(cgroups.CONTROLLERS, f"/qnix/{name}")
    finally:
        cgroups.remove(cgroup)


def test_launch_sets_no_new_privs_itself(netns_path: str) -> None:
    """Whatever bubblewrap does, the launcher sets no_new_privs before it runs."""
    process = ns.launch(
        [need("grep"), "NoNewPrivs", "/proc/self/status"],
        netns_path=netns_path,
        cgroup=None,
        stdout=subprocess.PIPE,
    )
    assert process.communicate(timeout=30)[0] == b"NoNewPrivs:\t1\n"


def test_launch_passes_only_the_given_descriptors(netns_path: str) -> None:
    kept, dropped = os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)
    try:
        os.set_inheritable(dropped, True)
        listing = (
            "import json, os; print(json.dumps(sorted(map(int, os.listdir('/proc/self/fd')))))"
        )
        process = ns.launch(
            py(listing), netns_path=netns_path, cgroup=None, pass_fds=[kept], stdout=subprocess.PIPE
        )
        # stdin, stdout, stderr, the one passed, and the listing's own directory descriptor,
        # which takes the lowest free number: nothing else came along.
        listed = min(n for n in range(3, 1024) if n != kept)
        fds = json.loads(process.communicate(timeout=30)[0])
        assert fds == sorted({0, 1, 2, kept, listed})
        assert dropped not in fds or dropped == listed
        alone = ns.launch(py(listing), netns_path=netns_path, cgroup=None, stdout=subprocess.PIPE)
        assert json.loads(alone.communicate(timeout=30)[0]) == [0, 1, 2, 3]
    finally:
        os.close(kept)
        os.close(dropped)


def test_launch_as_an_unprivileged_host_user(netns_path: str) -> None:
    nobody = ns.HostIdentity(65534, 65534)
    ids = ns.launch(
        [need("sh"), "-c", "id -u; id -g; id -G"],
        netns_path=netns_path,
        cgroup=None,
        run_as=nobody,
        stdout=subprocess.PIPE,
    )
    assert ids.communicate(timeout=30)[0] == b"65534\n65534\n65534\n"
    # A whole compartment that way: bubblewrap itself unprivileged, the user mapped to nobody,
    # so what it writes in its home belongs to nobody on the host.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="qnixtest-") as home:
        os.chown(home, 65534, 65534)
        plan = SandboxPlan(name="work", home=Path(home), user="alice")
        system = ns.host_system_binds(interpreter_prefix=None)
        command = ["/bin/sh", "-c", "id -un; touch made-inside"]
        with ns.prepare(plan, command, system=system) as prepared:
            process = ns.launch(
                prepared.argv,
                netns_path=netns_path,
                cgroup=None,
                pass_fds=prepared.fds,
                run_as=nobody,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        out, err = process.communicate(timeout=30)
        assert (process.returncode, out) == (0, b"alice\n"), err
        made = Path(home) / "made-inside"
        assert (made.stat().st_uid, made.stat().st_gid) == (65534, 65534)


def test_launch_errors_are_clear(tmp_path: Path, netns_path: str) -> None:
    with pytest.raises(QnixError) as missing:
        ns.launch(["true"], netns_path="/run/netns/qnixtest-absent", cgroup=None)
    assert (
        missing.value.message == "cannot open /run/netns/qnixtest-absent: No such file or directory"
    )
    not_a_namespace = tmp_path / "plain-file"
    not_a_namespace.write_text("")
    with pytest.raises(QnixError) as refused:
        ns.launch([need("true")], netns_path=str(not_a_namespace), cgroup=None)
    assert refused.value.message.startswith(f"could not start {need('true')}: entering the network")
    with pytest.raises(QnixError, match="command not found: /nonexistent/bwrap"):
        ns.launch(["/nonexistent/bwrap"], netns_path=netns_path, cgroup=None)
