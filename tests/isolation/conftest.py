"""The live escape suite's machinery: real bubblewrap, seccomp, network namespaces and cgroups.

A protected run starts a probe exactly as qnix starts a compartment (prepare + launch, inside a
network namespace of its own). A control run starts the same command line with one protection
taken out by an edit of the argv (or with no seccomp program), so each test shows both that the
attack fails and that it is the named protection that makes it fail.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qnix.runtime import cgroups
from qnix.runtime.backends import namespace as ns
from tests.conftest import need
from tests.runtime.livehost import describe_cgroups

# The interpreter itself, not a virtual environment's link to it: its prefix is what the
# compartment gets bound (host_system_binds), and probes need nothing but the standard library.
PYTHON = os.path.realpath(sys.executable)
TEST_PREFIX = "qnixtest"

# ---- editing a bubblewrap command line -----------------------------------------------------------

# How many values each option the backend emits takes; --perms/--size modify the option after them.
ARITY = {
    "--unshare-user": 0,
    "--unshare-pid": 0,
    "--unshare-ipc": 0,
    "--unshare-uts": 0,
    "--unshare-cgroup": 0,
    "--disable-userns": 0,
    "--die-with-parent": 0,
    "--new-session": 0,
    "--clearenv": 0,
    "--uid": 1,
    "--gid": 1,
    "--hostname": 1,
    "--cap-drop": 1,
    "--cap-add": 1,
    "--tmpfs": 1,
    "--dir": 1,
    "--proc": 1,
    "--dev": 1,
    "--remount-ro": 1,
    "--chdir": 1,
    "--seccomp": 1,
    "--setenv": 2,
    "--ro-bind": 2,
    "--bind": 2,
    "--dev-bind": 2,
    "--symlink": 2,
    "--ro-bind-data": 2,
}
MODIFIERS = {"--perms", "--size"}

Group = tuple[str, ...]
Edit = Callable[[list[Group]], list[Group]]


def split(argv: Sequence[str]) -> tuple[str, list[Group], list[str]]:
    """bwrap, its options as groups (an option with its values and modifiers), the command."""
    end = list(argv).index("--")
    tokens, groups, index = list(argv[1:end]), [], 0
    while index < len(tokens):
        start = index
        while tokens[index] in MODIFIERS:
            index += 2
        option = tokens[index]
        if option not in ARITY:
            raise AssertionError(f"unknown bwrap option {option} in {argv}")
        index += 1 + ARITY[option]
        groups.append(tuple(tokens[start:index]))
    return argv[0], groups, list(argv[end + 1 :])


def main_option(group: Group) -> str:
    index = 0
    while group[index] in MODIFIERS:
        index += 2
    return group[index]


def drop(*options: str) -> Edit:
    """Remove every group of each named option (each must be there: a control must change
    the command line it claims to change)."""

    def edit(groups: list[Group]) -> list[Group]:
        for option in options:
            assert any(main_option(g) == option for g in groups), f"{option} not in argv"
        return [g for g in groups if main_option(g) not in options]

    return edit


def drop_group(*targets: Group) -> Edit:
    def edit(groups: list[Group]) -> list[Group]:
        for target in targets:
            assert target in groups, f"{target} not in argv"
        return [g for g in groups if g not in targets]

    return edit


def replace(old: Group, new: Group) -> Edit:
    def edit(groups: list[Group]) -> list[Group]:
        assert old in groups, f"{old} not in argv"
        return [new if g == old else g for g in groups]

    return edit


def append(group: Group) -> Edit:
    """Insert after the other mounts but before the root becomes read-only."""

    def edit(groups: list[Group]) -> list[Group]:
        at = groups.index(("--remount-ro", "/"))
        return [*groups[:at], group, *groups[at:]]

    return edit


# Host root with every capability, no user namespace: the attacker bubblewrap would be as root.
PRIVILEGED: tuple[Edit, ...] = (
    drop("--unshare-user", "--disable-userns", "--uid", "--gid", "--cap-drop"),
)
# Every capability inside the compartment's own user namespace.
CAPS_KEPT: tuple[Edit, ...] = (replace(("--cap-drop", "ALL"), ("--cap-add", "ALL")),)


def apply(argv: Sequence[str], edits: Sequence[Edit]) -> list[str]:
    bwrap, groups, command = split(argv)
    for edit in edits:
        groups = edit(groups)
    return [bwrap, *(token for group in groups for token in group), "--", *command]


# ---- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        """The probe's JSON report (its last output line)."""
        lines = self.stdout.strip().splitlines()
        assert lines, f"no report (exit {self.returncode}): {self.stderr}"
        value = json.loads(lines[-1])
        assert isinstance(value, dict)
        return value


def py(source: str, *args: str) -> list[str]:
    return [PYTHON, "-I", "-S", "-c", source, *args]


def plan(name: str = "probe", home: Path | None = None, **extra: Any) -> ns.SandboxPlan:
    return ns.SandboxPlan(name=name, home=home, user="user", **extra)


@dataclass
class Sandbox:
    netns_path: str
    bwrap: str = field(default_factory=lambda: need("bwrap"))

    def run(
        self,
        command: Sequence[str],
        *,
        sandbox: ns.SandboxPlan | None = None,
        edits: Sequence[Edit] = (),
        seccomp: bool = True,
        netns_path: str | None = None,
        cgroup: cgroups.Cgroup | None = None,
        run_as: ns.HostIdentity | None = None,
        env: Mapping[str, str] | None = None,
        extra_fds: Sequence[int] = (),
        stdin: int | None = subprocess.DEVNULL,
        outer: Sequence[str] = (),
        system: Sequence[ns.Directive] | None = None,
        timeout: float = 30,
    ) -> Outcome:
        """Run `command` as a compartment, always in a network namespace the tests made (by
        default the module's). `outer`: a host-side wrapper command that gets a JSON
        {"argv", "fds"} as its last argument and runs the sandbox itself."""
        chosen = sandbox if sandbox is not None else plan()
        with ns.prepare(
            chosen, command, with_seccomp=seccomp, system=system, bwrap=self.bwrap
        ) as prepared:
            argv = apply(prepared.argv, edits)
            fds = (*prepared.fds, *extra_fds)
            if outer:
                argv = [*outer, json.dumps({"argv": argv, "fds": fds})]
            process = ns.launch(
                argv,
                netns_path=netns_path or self.netns_path,
                cgroup=cgroup,
                pass_fds=fds,
                run_as=run_as,
                env=env,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"sandbox timed out: {err.decode(errors='replace')}") from None
        return Outcome(
            argv, process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )


# ---- host fixtures -------------------------------------------------------------------------------


def unique(kind: str) -> str:
    return f"{TEST_PREFIX}-{kind}-{secrets.token_hex(3)}"


class Netns:
    """Network namespaces made with `ip netns add`, deleted at teardown."""

    def __init__(self) -> None:
        self.ip = need("ip")
        self.names: list[str] = []

    def make(self) -> str:
        name = unique("ns")
        subprocess.run([self.ip, "netns", "add", name], check=True, capture_output=True)
        self.names.append(name)
        return f"/run/netns/{name}"

    def close(self) -> None:
        for name in self.names:
            subprocess.run([self.ip, "netns", "delete", name], check=True, capture_output=True)
        for name in self.names:
            assert not Path(f"/run/netns/{name}").exists()


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    made = Netns()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def sandbox(netns: Netns) -> Sandbox:
    return Sandbox(netns.make())


@pytest.fixture(scope="module")
def host_dir() -> Iterator[Path]:
    """A directory on the host outside anything a compartment is given (and outside /tmp)."""
    path = Path(tempfile.mkdtemp(prefix=f"{TEST_PREFIX}-", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module", autouse=True)
def no_cgroup_leftovers() -> Iterator[None]:
    """Every cgroup a test made is gone when the module ends."""
    before = set(cgroups.names())
    yield
    left = set(cgroups.names()) - before
    assert not left, f"cgroups left behind under qnix/: {describe_cgroups(left)}"


class Cgroups:
    def __init__(self) -> None:
        self.made: list[cgroups.Cgroup] = []

    def make(self, limits: cgroups.CgroupLimits) -> cgroups.Cgroup:
        made = cgroups.create(unique("cg"), limits)
        self.made.append(made)
        return made

    def close(self) -> None:
        for made in self.made:
            cgroups.kill(made)
            cgroups.remove(made)


@pytest.fixture
def cgroup_factory() -> Iterator[Cgroups]:
    factory = Cgroups()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def marker() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A host process (root, outside any compartment) with a unique command line."""
    tag = f"{secrets.randbelow(10**6) + 10**6}"
    process = subprocess.Popen([need("sleep"), f"3{tag}"])
    try:
        yield process, f"3{tag}"
    finally:
        process.kill()
        process.wait()
