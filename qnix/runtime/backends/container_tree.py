"""A container's root tree: the steps that write it into the launcher's private tmpfs (pure,
so a compartment's whole tree can be checked exactly), and carrying them out."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qnix.runtime import secrets
from qnix.runtime.backends import namespace as ns


@dataclass(frozen=True, slots=True)
class Layout:
    """What the launcher's private tmpfs holds; `staging` is its mount point."""

    staging: str

    def __post_init__(self) -> None:
        ns.check_path(self.staging, "staging directory")

    @property
    def root(self) -> str:
        return f"{self.staging}/root"

    @property
    def home(self) -> str:
        """A disposable's home."""
        return f"{self.staging}/home"

    @property
    def runtime_dir(self) -> str:
        """Bound at /run/user/<uid>."""
        return f"{self.staging}/run-user"

    @property
    def secrets(self) -> str:
        """Bound read-only at /run/secrets."""
        return f"{self.staging}/secrets"


@dataclass(frozen=True, slots=True)
class MakeDir:
    path: str
    mode: int
    owner: int = 0  # uid and gid


@dataclass(frozen=True, slots=True)
class MakeLink:
    target: str
    path: str


@dataclass(frozen=True, slots=True)
class WriteFile:
    """A file whose content is `data`, or copied from descriptor `data`."""

    path: str
    data: bytes | int
    mode: int
    owner: int = 0


Step = MakeDir | MakeLink | WriteFile

# Mount points the container always has: nspawn mounts its API file systems and tmpfs there.
BASE_DIRS = ("/dev", "/proc", "/sys", "/run", "/tmp", "/var/tmp", "/etc", "/home", "/opt")  # noqa: S108
DIR_MODE = 0o755
FILE_MODE = 0o444


def _inside(layout: Layout, path: str) -> str:
    return layout.root + ns.check_path(path, "path inside")


class _Tree:
    """Steps in order, each parent directory made once, before anything in it."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.steps: list[Step] = []
        self.made: set[str] = {layout.staging}  # the tmpfs itself

    def dir(self, path: str, mode: int = DIR_MODE, owner: int = 0) -> None:
        """A directory at host path `path` (under the staging tmpfs)."""
        if path in self.made:
            return
        self.dir(os.path.dirname(path))
        self.steps.append(MakeDir(path, mode, owner))
        self.made.add(path)

    def file(self, path: str, data: bytes | int, mode: int = FILE_MODE, owner: int = 0) -> None:
        self.dir(os.path.dirname(path))
        self.steps.append(WriteFile(path, data, mode, owner))
        self.made.add(path)

    def link(self, target: str, path: str) -> None:
        self.dir(os.path.dirname(path))
        self.steps.append(MakeLink(target, path))
        self.made.add(path)

    def mount_point(self, inside: str, directory: bool) -> None:
        if inside.startswith("/run/"):
            return  # nspawn mounts a fresh tmpfs on /run and makes these in it
        path = _inside(self.layout, inside)
        if directory:
            self.dir(path)
        elif path not in self.made:
            self.file(path, b"", FILE_MODE)


def tree_steps(
    plan: ns.SandboxPlan,
    layout: Layout,
    *,
    host_uid: int,
    system: Sequence[ns.Directive],
    files: Mapping[str, bytes | int],
    secret_files: Mapping[str, int],
    os_release: bytes,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> tuple[Step, ...]:
    """What the launcher writes into its tmpfs, in order: the root tree (root's, read-only for
    the user), a disposable's home and the runtime folder (the user's, 0700), the secrets (the
    user's, 0400, in a 0500 folder). `files` maps paths inside to their content or a
    descriptor holding it; `is_dir` tells a bind's mount point to be a folder or a file."""
    tree = _Tree(layout)
    tree.dir(layout.root)
    for path in BASE_DIRS:
        tree.dir(_inside(layout, path))
    tree.dir(_inside(layout, "/root"), 0o700)
    tree.dir(_inside(layout, plan.home_inside))
    for directive in system:
        if isinstance(directive, ns.Symlink):
            tree.link(directive.target, _inside(layout, directive.link))
        elif isinstance(directive, ns.RoBind):
            tree.mount_point(directive.dst, is_dir(directive.src))
        else:
            raise ValueError(f"a container's system view takes binds and symlinks: {directive}")
    for path, data in sorted(ns.identity_files(plan).items()):
        tree.file(_inside(layout, path), data)
    tree.file(_inside(layout, "/etc/os-release"), os_release)
    for path, source in sorted(files.items()):
        tree.file(_inside(layout, path), source)
    for src, dst in (*plan.extra_ro_binds, *plan.extra_binds):
        tree.mount_point(dst, is_dir(src))
    tree.dir(layout.runtime_dir, 0o700, host_uid)
    if plan.home is None:
        tree.dir(layout.home, 0o700, host_uid)
    if secret_files:
        tree.dir(layout.secrets, 0o500, host_uid)
        for name, fd in sorted(secret_files.items()):
            inside = secrets.inside_path(name)  # refuses anything but a secret's name
            tree.file(
                f"{layout.secrets}/{os.path.basename(inside)}", fd, secrets.SECRET_MODE, host_uid
            )
    return tuple(tree.steps)


def _copy(source: int, target: int) -> None:
    """All of descriptor `source` (from its start) into `target`, in the kernel."""
    size = os.fstat(source).st_size
    offset = 0
    while offset < size:
        sent = os.sendfile(target, source, offset, size - offset)
        if sent == 0:
            raise OSError(errno.EIO, "short copy")
        offset += sent


def write_tree(steps: Sequence[Step]) -> None:
    """Carry out the steps (in the launcher's private tmpfs)."""
    for step in steps:
        if isinstance(step, MakeDir):
            os.mkdir(step.path, step.mode)
            os.chmod(step.path, step.mode)  # not narrowed by the umask
            if step.owner:
                os.chown(step.path, step.owner, step.owner)
        elif isinstance(step, MakeLink):
            os.symlink(step.target, step.path)
        else:
            fd = os.open(step.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                if isinstance(step.data, int):
                    _copy(step.data, fd)
                else:
                    os.write(fd, step.data)
                if step.owner:
                    os.fchown(fd, step.owner, step.owner)
                os.fchmod(fd, step.mode)
            finally:
                os.close(fd)
