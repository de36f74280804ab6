"""systemd-nspawn's options as directives, one option each, checked when made: a container's
whole command line is a list of these (qnix.runtime.backends.container.nspawn_argv), as
bubblewrap's is for the namespace backend."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qnix.runtime.backends import namespace as ns
from qnix.spec.model import COMPARTMENT_NAME_RE, UNIX_USER_RE

SYSCALL_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# A machine name (nspawn: a valid host name): here always a cgroup name.
MACHINE_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

# Names are checked with fullmatch: `$` in re.match also accepts a trailing newline.


def escape_path(path: str) -> str:
    """A path as one field of nspawn's `SRC:DST[:OPTIONS]`: nspawn splits on ':' and takes a
    backslash as escaping the next character, so both are escaped and nothing in a path can
    end its field or add options."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True, slots=True)
class RoBind(ns.BindPaths):
    def argv(self) -> list[str]:
        return [f"--bind-ro={escape_path(self.src)}:{escape_path(self.dst)}"]


@dataclass(frozen=True, slots=True)
class Bind(ns.BindPaths):
    def argv(self) -> list[str]:
        return [f"--bind={escape_path(self.src)}:{escape_path(self.dst)}"]


@dataclass(frozen=True, slots=True)
class Tmpfs:
    dst: str
    mode: int

    def __post_init__(self) -> None:
        ns.check_path(self.dst, "tmpfs mount point")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"invalid mode {self.mode:o}")

    def argv(self) -> list[str]:
        return [f"--tmpfs={escape_path(self.dst)}:mode={self.mode:04o}"]


@dataclass(frozen=True, slots=True)
class Directory:
    """The container's root directory."""

    path: str

    def argv(self) -> list[str]:
        return [f"--directory={ns.check_path(self.path, 'root directory')}"]


@dataclass(frozen=True, slots=True)
class Machine:
    name: str

    def __post_init__(self) -> None:
        if not MACHINE_RE.fullmatch(self.name):
            raise ValueError(f"invalid machine name {self.name!r}")

    def argv(self) -> list[str]:
        return [f"--machine={self.name}"]


@dataclass(frozen=True, slots=True)
class Hostname:
    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(COMPARTMENT_NAME_RE, self.name):
            raise ValueError(f"invalid hostname {self.name!r}")

    def argv(self) -> list[str]:
        return [f"--hostname={self.name}"]


@dataclass(frozen=True, slots=True)
class PrivateUsers:
    """The container's uids and gids 0..size-1 are the host's base..base+size-1."""

    base: int
    size: int

    def __post_init__(self) -> None:
        # Never the host's root, and never past the last uid (0xFFFFFFFF means "no uid").
        if self.base < 1 or self.size < 1 or self.base + self.size > 0xFFFFFFFF:
            raise ValueError(f"invalid user namespace range {self.base}:{self.size}")

    def argv(self) -> list[str]:
        return [f"--private-users={self.base}:{self.size}", "--private-users-ownership=off"]


@dataclass(frozen=True, slots=True)
class User:
    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(UNIX_USER_RE, self.name) or self.name == "root":
            raise ValueError(f"invalid user name {self.name!r}")

    def argv(self) -> list[str]:
        return [f"--user={self.name}"]


@dataclass(frozen=True, slots=True)
class Chdir:
    path: str

    def argv(self) -> list[str]:
        return [f"--chdir={ns.check_path(self.path, 'working directory')}"]


@dataclass(frozen=True, slots=True)
class SetEnv:
    key: str
    value: str

    def __post_init__(self) -> None:
        if not ns.ENV_KEY_RE.fullmatch(self.key) or "\0" in self.value:
            raise ValueError(f"invalid environment variable {self.key!r}")

    def argv(self) -> list[str]:
        return [f"--setenv={self.key}={self.value}"]


@dataclass(frozen=True, slots=True)
class SystemCallFilter:
    """A deny-list: each call fails with EPERM."""

    denied: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.denied or not all(SYSCALL_NAME_RE.fullmatch(name) for name in self.denied):
            raise ValueError(f"invalid system call names {self.denied!r}")

    def argv(self) -> list[str]:
        return ["--system-call-filter=~" + " ".join(self.denied)]


Directive = (
    RoBind
    | Bind
    | Tmpfs
    | Directory
    | Machine
    | Hostname
    | PrivateUsers
    | User
    | Chdir
    | SetEnv
    | SystemCallFilter
)

# Options with no value from the plan, each with why.
FIXED_OPTIONS = (
    "--quiet",
    # No machined, no scope unit, no bus: the keeper owns the cgroup, and PID 1 need not be
    # systemd.
    "--register=no",
    "--keep-unit",
    # The agent's stdout is the launcher's: its "ready" reaches the keeper.
    "--console=pipe",
    # The tree (root's) cannot be written anyway; read-only also keeps nspawn's own view honest.
    "--read-only",
    "--no-new-privileges=yes",
    "--drop-capability=all",
    # /etc is the compartment's own: nspawn must not copy the host's resolv.conf or time zone in.
    "--resolv-conf=off",
    "--timezone=off",
    "--link-journal=no",
)
