"""cgroups: detection from the mount table, the exact setup for v1 and v2, and the real thing on
this host (create, limits, attach, kill, remove, list)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.errors import QnixError
from qnix.runtime import cgroups
from qnix.runtime.cgroups import CgroupHost, CgroupLimits, Hierarchy, Mkdir, Write
from tests.conftest import need

V1_MEMORY = Path("/sys/fs/cgroup/memory")
V1_PIDS = Path("/sys/fs/cgroup/pids")


def mounts_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text(text)
    return path


def test_detect_v1_and_an_empty_unified_hierarchy(tmp_path: Path) -> None:
    """A hybrid host: the v2 hierarchy exists but holds neither controller."""
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    text = (
        "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,pids 0 0\n"
        f"cgroup2 {unified} cgroup2 rw,relatime 0 0\n"
    )
    assert cgroups.detect(mounts_file(tmp_path, text)) == CgroupHost(
        memory=Hierarchy(1, V1_MEMORY), pids=Hierarchy(1, V1_PIDS)
    )


def test_detect_pure_v2(tmp_path: Path) -> None:
    root = tmp_path / "cgroup root"  # a space: written \040 in the mount table
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    escaped = str(root).replace(" ", "\\040")
    text = f"cgroup2 {escaped} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
    host = cgroups.detect(mounts_file(tmp_path, text))
    assert host == CgroupHost(memory=Hierarchy(2, root), pids=Hierarchy(2, root))
    assert host.hierarchies() == (Hierarchy(2, root),)


def test_v2_controllers_win_over_v1(tmp_path: Path) -> None:
    root = tmp_path / "v2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("pids\n")
    text = (
        "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
        "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n"
        f"cgroup2 {root} cgroup2 rw 0 0\n"
    )
    assert cgroups.detect(mounts_file(tmp_path, text)) == CgroupHost(
        memory=Hierarchy(1, V1_MEMORY), pids=Hierarchy(2, root)
    )


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("proc /proc proc rw 0 0\n", "memory"),
        ("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n", "pids"),
    ],
)
def test_missing_controller_is_an_error(tmp_path: Path, text: str, missing: str) -> None:
    host = cgroups.detect(mounts_file(tmp_path, text))
    with pytest.raises(QnixError) as caught:
        host.require()
    assert caught.value.message == f"this host has no cgroup {missing} controller"
    assert "never runs a compartment without limits" in caught.value.hint
    with pytest.raises(QnixError):
        cgroups.create("work", CgroupLimits(64 << 20, 32), host)


def test_detect_this_host() -> None:
    host = cgroups.detect()
    host.require()
    mounts = {
        line.split()[1]: line.split()[2]
        for line in Path("/proc/self/mounts").read_text().splitlines()
    }
    for hierarchy in host.hierarchies():
        assert mounts[str(hierarchy.mount)] == ("cgroup2" if hierarchy.version == 2 else "cgroup")
        assert (hierarchy.mount / "cgroup.procs").exists()


def test_setup_steps_v2() -> None:
    root = Path("/sys/fs/cgroup")
    host = CgroupHost(memory=Hierarchy(2, root), pids=Hierarchy(2, root))
    work = root / "qnix" / "work"
    assert cgroups.setup_steps("work", CgroupLimits(512 << 20, 256), host) == (
        Write(root / "cgroup.subtree_control", "+memory +pids"),
        Mkdir(root / "qnix"),
        Write(root / "qnix" / "cgroup.subtree_control", "+memory +pids"),
        Mkdir(work),
        Write(work / "memory.max", str(512 << 20)),
        Write(work / "memory.swap.max", "0", if_present=True),
        Write(work / "pids.max", "256"),
    )


def test_setup_steps_v1() -> None:
    host = CgroupHost(memory=Hierarchy(1, V1_MEMORY), pids=Hierarchy(1, V1_PIDS))
    memory, pids = V1_MEMORY / "qnix" / "work", V1_PIDS / "qnix" / "work"
    assert cgroups.setup_steps("work", CgroupLimits(512 << 20, 256), host) == (
        Mkdir(V1_MEMORY / "qnix"),
        Mkdir(memory),
        Write(memory / "memory.memsw.limit_in_bytes", "-1", if_present=True),
        Write(memory / "memory.limit_in_bytes", str(512 << 20)),
        Write(memory / "memory.memsw.limit_in_bytes", str(512 << 20), if_present=True),
        Mkdir(V1_PIDS / "qnix"),
        Mkdir(pids),
        Write(pids / "pids.max", "256"),
    )


def test_a_missing_cgroup_file_is_a_clear_error(tmp_path: Path) -> None:
    """On a cgroup file system a file that is not there means a controller is not enabled."""
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    host = CgroupHost(memory=Hierarchy(2, tmp_path), pids=Hierarchy(2, tmp_path))
    with pytest.raises(QnixError) as caught:
        cgroups.create("work", CgroupLimits(64 << 20, 32), host)
    expected = f"{tmp_path}/qnix/cgroup.subtree_control: No such file or directory"
    assert caught.value.message == f"cannot set up cgroup qnix/work: {expected}"


@pytest.mark.parametrize(("memory", "pids"), [(0, 10), ((4 << 20) - 1, 10), (64 << 20, 0)])
def test_limits_refuse_nonsense(memory: int, pids: int) -> None:
    with pytest.raises(ValueError, match="below"):
        CgroupLimits(memory, pids)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70))
def test_names_never_leave_the_qnix_directory(name: str) -> None:
    host = CgroupHost(memory=Hierarchy(1, V1_MEMORY), pids=Hierarchy(1, V1_PIDS))
    try:
        cgroup = cgroups.cgroup_of(name, host)
    except QnixError as error:
        assert error.message == f"invalid cgroup name {name!r}"
        assert not cgroups.NAME_RE.match(name)
        return
    assert cgroup.paths == (V1_MEMORY / "qnix" / name, V1_PIDS / "qnix" / name)
    assert all(path.parent.name == "qnix" and path.name == name for path in cgroup.paths)


# ---- the real thing --------------------------------------------------------------------------


@pytest.fixture
def name() -> Iterator[str]:
    chosen = f"qnixtest-unit-{secrets.token_hex(3)}"
    yield chosen
    cgroup = cgroups.cgroup_of(chosen, cgroups.detect())
    cgroups.kill(cgroup)
    cgroups.remove(cgroup)
    assert chosen not in cgroups.names()


def test_create_applies_the_limits(name: str) -> None:
    host = cgroups.detect()
    limits = CgroupLimits(96 << 20, 48)
    cgroup = cgroups.create(name, limits, host)
    assert name in cgroups.names(host)
    assert all(path.is_dir() for path in cgroup.paths)
    written = [s for s in cgroups.setup_steps(name, limits, host) if isinstance(s, Write)]
    # The last write to each file is what it holds.
    final = {s.path: s for s in written if s.path.parent.name == name and s.path.exists()}
    checked = list(final.values())
    assert {s.path.name for s in checked} >= {"pids.max"}
    assert any(s.path.name in ("memory.max", "memory.limit_in_bytes") for s in checked)
    for step in checked:
        assert step.path.read_text().strip() == step.value


def test_attach_kill_remove(name: str) -> None:
    cgroup = cgroups.create(name, CgroupLimits(64 << 20, 16))
    sleeper = subprocess.Popen([need("sleep"), "60"])
    try:
        cgroups.attach(cgroup, sleeper.pid)
        assert cgroups.processes(cgroup) == {sleeper.pid}
        with pytest.raises(QnixError) as caught:
            cgroups.remove(cgroup, timeout=0.1)
        assert f"(processes: [{sleeper.pid}])" in caught.value.message
        with pytest.raises(QnixError, match="already holds processes"):
            cgroups.create(name, CgroupLimits(64 << 20, 16))
        cgroups.kill(cgroup)
        assert sleeper.wait(timeout=5) == -9
    finally:
        sleeper.kill()
        sleeper.wait()
    cgroups.remove(cgroup)
    assert not any(path.exists() for path in cgroup.paths)
    assert name not in cgroups.names()
    cgroups.remove(cgroup)  # removing what is gone is fine (garbage collection may race)


def test_an_empty_leftover_is_reused(name: str) -> None:
    first = cgroups.create(name, CgroupLimits(64 << 20, 16))
    second = cgroups.create(name, CgroupLimits(128 << 20, 32))
    assert first == second
    host = cgroups.detect()
    pids, memory = host.hierarchy("pids"), host.hierarchy("memory")
    assert (pids.mount / "qnix" / name / "pids.max").read_text() == "32\n"
    limit = "memory.max" if memory.version == 2 else "memory.limit_in_bytes"
    assert (memory.mount / "qnix" / name / limit).read_text() == f"{128 << 20}\n"
    cgroups.create(name, CgroupLimits(64 << 20, 16))  # and down again
    assert (memory.mount / "qnix" / name / limit).read_text() == f"{64 << 20}\n"
