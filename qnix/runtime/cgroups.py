"""Memory and process-count limits for compartments, through cgroups (v2, or the v1 controllers).

Each compartment gets a cgroup `qnix/<name>` in every hierarchy that carries one of the two
controllers: one directory on a cgroup v2 host, two (memory/, pids/) on a v1 or hybrid host.
Everything here is a file write under the cgroup mount; no subprocess. A host without either
controller is an error: qnix never runs a compartment silently unlimited.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qnix.errors import QnixError

Controller = Literal["memory", "pids"]
CONTROLLERS: tuple[Controller, ...] = ("memory", "pids")
QNIX_DIR = "qnix"
MOUNTS = Path("/proc/self/mounts")
# A cgroup name becomes a directory name: no slash, no dot, nothing a path could misread.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MISSING_HINT = (
    "qnix never runs a compartment without limits: boot with cgroup v2 "
    "(systemd.unified_cgroup_hierarchy=1) or mount the cgroup v1 memory and pids controllers"
)


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory_bytes: int
    pids: int

    def __post_init__(self) -> None:
        # Below a few MiB nothing starts, and a zero limit would read as "unlimited" to a human.
        if self.memory_bytes < 4 << 20:
            raise ValueError(f"memory limit {self.memory_bytes} is below 4 MiB")
        if self.pids < 1:
            raise ValueError(f"pids limit {self.pids} is below 1")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    version: Literal[1, 2]
    mount: Path


@dataclass(frozen=True, slots=True)
class CgroupHost:
    """Where each controller lives on this host (None: the host does not have it)."""

    memory: Hierarchy | None
    pids: Hierarchy | None

    def hierarchy(self, controller: Controller) -> Hierarchy:
        found = self.memory if controller == "memory" else self.pids
        if found is None:
            raise QnixError(f"this host has no cgroup {controller} controller", hint=MISSING_HINT)
        return found

    def hierarchies(self) -> tuple[Hierarchy, ...]:
        """Each hierarchy holding at least one of the controllers, once."""
        seen: list[Hierarchy] = []
        for found in (self.memory, self.pids):
            if found is not None and found not in seen:
                seen.append(found)
        return tuple(seen)

    def require(self) -> None:
        for controller in CONTROLLERS:
            self.hierarchy(controller)


@dataclass(frozen=True, slots=True)
class Cgroup:
    """A compartment's cgroup: one directory per hierarchy."""

    name: str
    paths: tuple[Path, ...]

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(path / "cgroup.procs" for path in self.paths)


@dataclass(frozen=True, slots=True)
class Mkdir:
    path: Path


@dataclass(frozen=True, slots=True)
class Write:
    path: Path
    value: str
    # Only where the kernel offers the file (swap accounting is a boot option).
    if_present: bool = False


Step = Mkdir | Write


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def detect(mounts: Path = MOUNTS) -> CgroupHost:
    """Find the memory and pids controllers: in the v2 hierarchy when it has them, else in v1."""
    v2: list[Path] = []
    v1: dict[Controller, Path] = {}
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = Path(_unescape(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            v2.append(mountpoint)
        elif fstype == "cgroup":
            for controller in CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, mountpoint)
    found: dict[Controller, Hierarchy | None] = {}
    for controller in CONTROLLERS:
        found[controller] = None
        for mountpoint in v2:
            if controller in _v2_controllers(mountpoint):
                found[controller] = Hierarchy(2, mountpoint)
                break
        if found[controller] is None and controller in v1:
            found[controller] = Hierarchy(1, v1[controller])
    return CgroupHost(memory=found["memory"], pids=found["pids"])


def _v2_controllers(mountpoint: Path) -> set[str]:
    try:
        return set((mountpoint / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise QnixError(
            f"invalid cgroup name {name!r}",
            hint="a compartment name: lower-case letters, digits and '-', starting with a letter",
        )
    return name


def cgroup_of(name: str, host: CgroupHost) -> Cgroup:
    """The cgroup a compartment called `name` has (or would have) on this host."""
    _check_name(name)
    host.require()
    return Cgroup(name, tuple(h.mount / QNIX_DIR / name for h in host.hierarchies()))


def setup_steps(name: str, limits: CgroupLimits, host: CgroupHost) -> tuple[Step, ...]:
    """The directories and writes that give `name` its limits, in order (pure)."""
    cgroup = cgroup_of(name, host)
    steps: list[Step] = []
    for hierarchy, path in zip(host.hierarchies(), cgroup.paths, strict=True):
        here = [c for c in CONTROLLERS if host.hierarchy(c) == hierarchy]
        parent = path.parent
        if hierarchy.version == 2:
            # v2 hands a controller to children only when each ancestor enables it below itself.
            enable = " ".join(f"+{c}" for c in here)
            steps += [
                Write(hierarchy.mount / "cgroup.subtree_control", enable),
                Mkdir(parent),
                Write(parent / "cgroup.subtree_control", enable),
                Mkdir(path),
            ]
            if "memory" in here:
                steps += [
                    Write(path / "memory.max", str(limits.memory_bytes)),
                    Write(path / "memory.swap.max", "0", if_present=True),
                ]
            if "pids" in here:
                steps.append(Write(path / "pids.max", str(limits.pids)))
        else:
            steps += [Mkdir(parent), Mkdir(path)]
            if "memory" in here:
                # memsw counts memory + swap and may never be below the memory limit: lift it
                # first, so the limit can move either way (a reused cgroup), then match it.
                memsw = path / "memory.memsw.limit_in_bytes"
                steps += [
                    Write(memsw, "-1", if_present=True),
                    Write(path / "memory.limit_in_bytes", str(limits.memory_bytes)),
                    Write(memsw, str(limits.memory_bytes), if_present=True),
                ]
            if "pids" in here:
                steps.append(Write(path / "pids.max", str(limits.pids)))
    return tuple(steps)


def _write(path: Path, value: str) -> None:
    # No O_CREAT: on a cgroup file system a missing file means a controller is not enabled.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def create(name: str, limits: CgroupLimits, host: CgroupHost | None = None) -> Cgroup:
    """Create (or, after a crash, reuse an empty) `qnix/<name>` with `limits` applied."""
    host = host if host is not None else detect()
    cgroup = cgroup_of(name, host)
    if processes(cgroup):
        raise QnixError(
            f"cgroup qnix/{name} already holds processes",
            hint=f"is compartment {name} running? stop it, or run `qnix gc`",
        )
    for step in setup_steps(name, limits, host):
        try:
            if isinstance(step, Mkdir):
                step.path.mkdir(exist_ok=True)
            elif not step.if_present or step.path.exists():
                _write(step.path, step.value)
        except OSError as exc:
            raise QnixError(
                f"cannot set up cgroup qnix/{name}: {step.path}: {exc.strerror}",
                hint="qnix needs root to create cgroups; is the controller enabled on this host?",
            ) from exc
    return cgroup


def attach(cgroup: Cgroup, pid: int) -> None:
    """Move process `pid` (and so everything it starts from now on) into the cgroup."""
    for procs in cgroup.procs_files:
        _write(procs, str(pid))


def inside_pid(host_pid: int) -> int | None:
    """The pid a process has in its own (innermost) pid namespace; None if it is gone."""
    try:
        status = Path(f"/proc/{host_pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def scope(tree: Cgroup, name: str, untrusted_inside_pid: int) -> Path:
    """Move the process of `tree` (a compartment's cgroup folders) whose pid inside is
    `untrusted_inside_pid` into a sub-cgroup `name` of the folder it is in: a scope of its own
    under the compartment's limits. Only a process already in the compartment moves."""
    _check_name(name)
    for folder in tree.paths:
        for host_pid in processes(Cgroup(tree.name, (folder,))):
            if inside_pid(host_pid) == untrusted_inside_pid:
                (folder / name).mkdir()
                _write(folder / name / "cgroup.procs", str(host_pid))
                return folder / name
    raise QnixError(
        f"no process {untrusted_inside_pid} in compartment {tree.name}'s cgroup to give a scope",
        hint="it ended at once, or the compartment's agent reported a wrong pid",
    )


def processes(cgroup: Cgroup) -> frozenset[int]:
    pids: set[int] = set()
    for procs in cgroup.procs_files:
        try:
            pids.update(int(line) for line in procs.read_text().split())
        except FileNotFoundError:
            continue
    return frozenset(pids)


def kill(cgroup: Cgroup, timeout: float = 5.0) -> None:
    """SIGKILL every process in the cgroup until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = processes(cgroup)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise QnixError(
                f"processes {sorted(pids)} in cgroup qnix/{cgroup.name} survived SIGKILL",
                hint="a process stuck in the kernel (D state); look at /proc/<pid>/stack",
            )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def remove(cgroup: Cgroup, timeout: float = 5.0) -> None:
    """Remove the cgroup once its processes are gone, waiting up to `timeout` for them to go."""
    deadline = time.monotonic() + timeout
    remaining = list(cgroup.paths)
    while remaining:
        try:
            remaining[0].rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # EBUSY: processes are still inside (or leaving; an exit takes a moment to show).
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise QnixError(
                    f"cannot remove cgroup {remaining[0]}: {exc.strerror}"
                    f" (processes: {sorted(processes(cgroup))})",
                    hint="stop the compartment first, then run `qnix gc`",
                ) from exc
            time.sleep(0.01)
            continue
        remaining.pop(0)


def names(host: CgroupHost | None = None) -> tuple[str, ...]:
    """Every compartment cgroup under qnix/ in any hierarchy (for garbage collection)."""
    host = host if host is not None else detect()
    found: set[str] = set()
    for hierarchy in host.hierarchies():
        found.update(_children(hierarchy.mount / QNIX_DIR))
    return tuple(sorted(found))


def _children(directory: Path) -> Iterable[str]:
    try:
        return [entry.name for entry in directory.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return []
