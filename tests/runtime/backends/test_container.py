"""The container backend's command line and tree, exactly; hostile names and paths against the
real systemd-nspawn; the cgroup folders it must clean up.

The live behaviour (escapes, lifecycle) is in tests/isolation/test_container_escapes.py and
tests/runtime/test_container_lifecycle.py.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qnix.errors import QnixError
from qnix.runtime import cgroups, live, seccomp
from qnix.runtime.backends import container
from qnix.runtime.backends import namespace as ns
from tests.conftest import need

HOST_UID = 0x70000005
PLAN = ns.SandboxPlan(
    name="work",
    home=Path("/var/lib/qnix/compartments/work/home"),
    user="alice",
    extra_binds=(("/run/qnix/compartments/work/agent", "/run/qnix-agent"),),
    extra_ro_binds=(("/run/qnix/compartments/work/call", "/run/qnix-call"),),
)
SYSTEM = (
    ns.RoBind("/usr", "/usr"),
    ns.Symlink("usr/bin", "/bin"),
    ns.RoBind("/etc/ssl", "/etc/ssl"),
    ns.RoBind("/etc/ld.so.cache", "/etc/ld.so.cache"),
)
LAYOUT = container.Layout("/run/qnix/compartments/work/container")
COMMAND = ["/usr/bin/python3", "-I", "-S", "/opt/qnix-agent/agent.py", "serve", "/run/x.sock"]
DENIED = " ".join((*seccomp.DENIED_SYSCALLS, "ptrace", "process_vm_readv", "process_vm_writev"))


def test_the_whole_command_line() -> None:
    argv = container.nspawn_argv(
        PLAN,
        COMMAND,
        layout=LAYOUT,
        host_uid=HOST_UID,
        machine="qnix-work",
        system=SYSTEM,
        with_secrets=True,
    )
    assert argv == [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--console=pipe",
        "--read-only",
        "--no-new-privileges=yes",
        "--drop-capability=all",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--directory=/run/qnix/compartments/work/container/root",
        "--machine=qnix-work",
        "--hostname=work",
        # uid 0 inside is 0x70000005 - 1000; the user, uid 1000, is 0x70000005.
        "--private-users=1879047197:1001",
        "--private-users-ownership=off",
        "--user=alice",
        "--chdir=/home/alice",
        f"--system-call-filter=~{DENIED}",
        "--setenv=HOME=/home/alice",
        "--setenv=USER=alice",
        "--setenv=LOGNAME=alice",
        "--setenv=SHELL=/bin/sh",
        "--setenv=PATH=/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin",
        "--setenv=LANG=C.UTF-8",
        "--setenv=XDG_RUNTIME_DIR=/run/user/1000",
        "--bind-ro=/usr:/usr",
        "--bind-ro=/etc/ssl:/etc/ssl",
        "--bind-ro=/etc/ld.so.cache:/etc/ld.so.cache",
        "--bind=/var/lib/qnix/compartments/work/home:/home/alice",
        "--bind=/run/qnix/compartments/work/container/run-user:/run/user/1000",
        "--tmpfs=/var/tmp:mode=1777",
        "--bind-ro=/run/qnix/compartments/work/call:/run/qnix-call",
        "--bind=/run/qnix/compartments/work/agent:/run/qnix-agent",
        "--bind-ro=/run/qnix/compartments/work/container/secrets:/run/secrets",
        "--",
        *COMMAND,
    ]
    assert HOST_UID == 1879047197 + 1000


def test_a_disposable_gets_its_home_from_the_private_tmpfs() -> None:
    disposable = ns.SandboxPlan(name="disp1", home=None, user="user", env=(("EDITOR", "vi"),))
    argv = container.nspawn_argv(
        disposable,
        ["/bin/true"],
        layout=container.Layout("/run/qnix/compartments/disp1/container"),
        host_uid=0x70000100,
        machine="qnix-disp1",
        system=(),
        with_secrets=False,
        nspawn="/usr/bin/systemd-nspawn",
    )
    assert argv[0] == "/usr/bin/systemd-nspawn"
    assert argv[argv.index("--setenv=XDG_RUNTIME_DIR=/run/user/1000") + 1 :] == [
        "--setenv=EDITOR=vi",
        "--bind=/run/qnix/compartments/disp1/container/home:/home/user",
        "--bind=/run/qnix/compartments/disp1/container/run-user:/run/user/1000",
        "--tmpfs=/var/tmp:mode=1777",
        "--",
        "/bin/true",
    ]
    assert f"--private-users={0x70000100 - 1000}:1001" in argv


def test_the_whole_tree() -> None:
    root = "/run/qnix/compartments/work/container/root"
    staging = "/run/qnix/compartments/work/container"
    steps = container.tree_steps(
        PLAN,
        LAYOUT,
        host_uid=HOST_UID,
        system=SYSTEM,
        files={"/opt/qnix-agent/agent.py": 7, "/etc/resolv.conf": b"nameserver 192.0.2.53\n"},
        secret_files={"bank-otp": 9},
        os_release=b"ID=debian\n",
        is_dir=lambda path: path != "/etc/ld.so.cache",
    )
    d, f = container.MakeDir, container.WriteFile
    assert steps == (
        d(root, 0o755),
        *(d(f"{root}/{top}", 0o755) for top in ("dev", "proc", "sys", "run", "tmp", "var")),
        d(f"{root}/var/tmp", 0o755),
        *(d(f"{root}/{top}", 0o755) for top in ("etc", "home", "opt")),
        d(f"{root}/root", 0o700),
        d(f"{root}/home/alice", 0o755),  # a mount point: the home is bound over it
        d(f"{root}/usr", 0o755),
        container.MakeLink("usr/bin", f"{root}/bin"),
        d(f"{root}/etc/ssl", 0o755),
        f(f"{root}/etc/ld.so.cache", b"", 0o444),  # a file's mount point is a file
        f(f"{root}/etc/group", b"root:x:0:\nalice:x:1000:\nnobody:x:65534:\n", 0o444),
        f(f"{root}/etc/hostname", b"work\n", 0o444),
        f(f"{root}/etc/hosts", b"127.0.0.1\tlocalhost work\n::1\tlocalhost work\n", 0o444),
        f(
            f"{root}/etc/passwd",
            b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            b"alice:x:1000:1000:alice:/home/alice:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            0o444,
        ),
        f(f"{root}/etc/os-release", b"ID=debian\n", 0o444),
        f(f"{root}/etc/resolv.conf", b"nameserver 192.0.2.53\n", 0o444),
        d(f"{root}/opt/qnix-agent", 0o755),
        f(f"{root}/opt/qnix-agent/agent.py", 7, 0o444),  # copied from descriptor 7
        # Under /run nspawn's own tmpfs holds the mount points; these are the user's.
        d(f"{staging}/run-user", 0o700, HOST_UID),
        d(f"{staging}/secrets", 0o500, HOST_UID),
        f(f"{staging}/secrets/bank-otp", 9, 0o400, HOST_UID),
    )


def test_a_disposable_tree_has_a_home_of_the_users_and_no_secrets() -> None:
    disposable = ns.SandboxPlan(name="disp1", home=None, user="user")
    steps = container.tree_steps(
        disposable,
        container.Layout("/s"),
        host_uid=0x70000100,
        system=(),
        files={},
        secret_files={},
        os_release=b"",
    )
    assert steps[-2:] == (
        container.MakeDir("/s/run-user", 0o700, 0x70000100),
        container.MakeDir("/s/home", 0o700, 0x70000100),
    )
    assert not any("secrets" in step.path for step in steps)


def test_a_bad_secret_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a secret name"):
        container.tree_steps(
            PLAN,
            LAYOUT,
            host_uid=HOST_UID,
            system=(),
            files={},
            secret_files={"../../etc/passwd": 3},
            os_release=b"",
        )


def test_a_system_view_takes_only_binds_and_symlinks() -> None:
    with pytest.raises(ValueError, match="binds and symlinks"):
        container.tree_steps(
            PLAN,
            LAYOUT,
            host_uid=HOST_UID,
            system=(ns.RoData(3, "/etc/x"),),
            files={},
            secret_files={},
            os_release=b"",
        )


def test_the_user_namespace_never_reaches_host_root() -> None:
    assert container.PrivateUsers(1, 1001).argv()[0] == "--private-users=1:1001"
    for base, size in ((0, 1001), (-5, 10), (0xFFFFFFFF - 10, 1001), (5, 0)):
        with pytest.raises(ValueError, match="user namespace range"):
            container.PrivateUsers(base, size)
    with pytest.raises(ValueError, match="uid and gid 1000"):
        container.nspawn_argv(
            ns.SandboxPlan(name="work", home=None, user="user", uid=1001),
            ["/bin/true"],
            layout=LAYOUT,
            host_uid=HOST_UID,
            machine="m",
            system=(),
            with_secrets=False,
        )


# ---- hostile names and paths ---------------------------------------------------------------------

# Characters that mean something to nspawn's option syntax, to a shell or to a path.
SPECIAL = [*":,\\ =-\n\t'\"$;*?[]{}~#%@!", "é", "☃", "\u202e"]
HOSTILE_NAME = st.text(
    alphabet=st.sampled_from([*SPECIAL, *"abcXYZ019"]), min_size=1, max_size=12
).filter(lambda name: name not in (".", ".."))
HOSTILE_PATH = st.lists(HOSTILE_NAME, min_size=1, max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)


def nspawn_fields(argument: str) -> list[str]:
    """How nspawn splits a --bind value: on ':', a backslash taking the next character as it is
    (its extract_first_word without flags)."""
    fields, current, escaped = [], "", False
    for character in argument:
        if escaped:
            current, escaped = current + character, False
        elif character == "\\":
            escaped = True
        elif character == ":":
            fields.append(current)
            current = ""
        else:
            current += character
    return [*fields, current]


@settings(max_examples=300, deadline=None)
@given(source=HOSTILE_PATH, destination=HOSTILE_PATH)
def test_a_bind_is_exactly_two_fields_whatever_its_paths(source: str, destination: str) -> None:
    for directive, option in ((container.Bind, "--bind="), (container.RoBind, "--bind-ro=")):
        argv = directive(source, destination).argv()
        assert len(argv) == 1 and argv[0].startswith(option)
        assert nspawn_fields(argv[0].removeprefix(option)) == [source, destination]
    tmpfs = container.Tmpfs(destination, 0o1777).argv()
    assert len(tmpfs) == 1
    assert nspawn_fields(tmpfs[0].removeprefix("--tmpfs=")) == [destination, "mode=1777"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
@example(text="root")  # a hostname, a machine, never a user
def test_a_hostile_name_never_reaches_the_command_line(text: str) -> None:
    """Compartment, user, machine names and environment keys are checked, never escaped:
    anything but a plain name is refused."""
    checks = (
        (lambda: container.Hostname(text), r"[a-z][a-z0-9-]{0,30}", ()),
        (lambda: container.Machine(text), r"[a-z][a-z0-9-]{0,62}", ()),
        (lambda: container.User(text), r"[a-z_][a-z0-9_-]{0,31}", ("root",)),  # never root
        (lambda: container.SetEnv(text, "v"), r"[A-Za-z_][A-Za-z0-9_]*", ()),
        (lambda: container.SystemCallFilter((text,)), r"[a-z_][a-z0-9_]*", ()),
    )
    for build, allowed, refused in checks:
        if re.fullmatch(allowed, text) and text not in refused:
            (argument,) = build().argv()
            assert argument.endswith(text) or f"{text}=v" in argument
        else:
            with pytest.raises(ValueError):
                build()


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/a//b", "/a/", "/a\0b", ""])
def test_an_unnormalized_path_is_refused(path: str) -> None:
    for build in (
        lambda: container.Bind(path, "/x"),
        lambda: container.RoBind("/x", path),
        lambda: container.Tmpfs(path, 0o755),
        lambda: container.Directory(path).argv(),
        lambda: container.Chdir(path).argv(),
        lambda: container.Layout(path),
    ):
        with pytest.raises(ValueError, match="absolute, normalized"):
            build()


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[str, cgroups.Cgroup, Path]]:
    """A network namespace, a cgroup and a folder for containers that are not compartments."""
    ip = need("ip")
    name = f"qnixtest-ct-{secrets.token_hex(3)}"
    subprocess.run([ip, "netns", "add", name], check=True)
    cgroup = cgroups.create(name, cgroups.CgroupLimits(256 << 20, 256))
    base = Path("/var/lib") / name
    base.mkdir(mode=0o755)
    try:
        yield f"/run/netns/{name}", cgroup, base
    finally:
        everything = container.cgroup_tree(cgroup)
        cgroups.kill(everything)
        cgroups.remove(everything)
        subprocess.run([ip, "netns", "delete", name], check=True)
        shutil.rmtree(base)  # staging folders are empty: each tmpfs was the launcher's own


READ_MARKERS = r"""
import json, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path + "/marker") as handle:
            out[path] = handle.read()
    except OSError as exc:
        out[path] = exc.strerror
print(json.dumps(out))
"""


@settings(max_examples=4, deadline=None)
@given(names=st.lists(HOSTILE_NAME, min_size=1, max_size=8, unique=True))
def test_hostile_paths_bind_exactly_where_they_say_in_the_real_nspawn(
    names: list[str], lab: tuple[str, cgroups.Cgroup, Path]
) -> None:
    """One real container per example, with a bind per hostile name: each destination holds
    the marker of its own source, so no name split its field, ended it early or added options."""
    netns_path, cgroup, base = lab
    run = base / secrets.token_hex(4)
    binds, wanted = [], {}
    for index, name in enumerate(names):
        source = run / f"src{index}" / name
        source.mkdir(parents=True)
        (source / "marker").write_text(f"marker {index}")
        destination = f"/srv/{index}/{name}"
        binds.append((str(source), destination))
        wanted[destination] = f"marker {index}"
    plan = ns.SandboxPlan(name="probe", home=None, user="user", extra_ro_binds=tuple(binds))
    python, prefix = live.agent_interpreter()  # what a compartment's agent runs with
    prepared = container.prepare(
        plan,
        [python, "-I", "-S", "-c", READ_MARKERS, json.dumps(list(wanted))],
        staging=run / "staging",
        host_uid=0x70000000 + 0x7F00,
        machine="qnixtest-ct",
        system=ns.host_system_binds(interpreter_prefix=prefix),
    )
    process = container.launch(
        prepared,
        netns_path=netns_path,
        cgroup=cgroup,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode(errors="replace")
    assert json.loads(out) == wanted


# ---- the host's pieces ---------------------------------------------------------------------------


def test_getent_must_be_visible_inside(tmp_path: Path) -> None:
    debian = tmp_path / "debian"
    (debian / "usr" / "bin").mkdir(parents=True)
    (debian / "usr" / "bin" / "getent").touch()
    container.require_getent((ns.RoBind("/usr", "/usr"),), debian)
    # NixOS: /usr holds only env, /bin only sh; getent lives in the store.
    nixos = tmp_path / "nixos"
    (nixos / "usr" / "bin").mkdir(parents=True)
    (nixos / "bin").mkdir()
    with pytest.raises(QnixError, match="getent"):
        container.require_getent((ns.RoBind("/usr", "/usr"), ns.RoBind("/bin", "/bin")), nixos)
    # Present on the host but not shown to the container is as good as absent.
    with pytest.raises(QnixError, match="getent"):
        container.require_getent((ns.RoBind("/etc/ssl", "/etc/ssl"),), debian)


def test_systemd_hierarchies_are_found_on_hybrid_and_unified_hosts(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup /sys/fs/cgroup/systemd cgroup rw,xattr,name=systemd 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n"
    )
    assert container.systemd_hierarchies(hybrid) == (
        Path("/sys/fs/cgroup/systemd"),
        Path("/sys/fs/cgroup/unified"),
    )
    unified = tmp_path / "unified"
    unified.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert container.systemd_hierarchies(unified) == (Path("/sys/fs/cgroup"),)


def test_the_cgroup_tree_lists_every_folder_deepest_first(tmp_path: Path) -> None:
    memory, systemd = tmp_path / "memory", tmp_path / "systemd"
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {systemd} cgroup rw,name=systemd 0 0\n")
    own = memory / "qnix" / "qnix-work"
    (own / "payload" / "inner").mkdir(parents=True)
    (own / "supervisor").mkdir()
    cgroup = cgroups.Cgroup("qnix-work", (own,))
    # Before launch: nothing in the systemd hierarchy yet.
    assert container.cgroup_tree(cgroup, mounts).paths[-1] == own
    placed = container.placement(cgroup, mounts)
    assert placed.paths == (own, systemd / "qnix" / "qnix-work")
    (systemd / "qnix" / "qnix-work" / "payload").mkdir()
    assert container.cgroup_tree(cgroup, mounts).paths == (
        own / "payload" / "inner",
        own / "payload",
        own / "supervisor",
        own,
        systemd / "qnix" / "qnix-work" / "payload",
        systemd / "qnix" / "qnix-work",
    )
    # On a unified host the compartment's own cgroup is in systemd's hierarchy: nothing extra.
    mounts.write_text(f"cgroup2 {memory} cgroup2 rw 0 0\n")
    assert container.placement(cgroup, mounts).paths == (own,)
