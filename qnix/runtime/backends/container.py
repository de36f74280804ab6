"""The container backend: a compartment is a systemd-nspawn container.

The same inputs as the namespace backend (a SandboxPlan, the host's system binds, the agent's
code, the programs and resolv.conf as sealed memfds, the secrets) become one systemd-nspawn
command line, built from small directives as bubblewrap's is, and a root tree that the launcher
writes into a tmpfs of its own. The decisions (tests/isolation/test_container_escapes.py checks
what each one protects):

* **The root tree lives in a tmpfs only the container sees.** nspawn cannot read files from
  inherited descriptors (bubblewrap's --ro-bind-data), and it hands every descriptor it inherits
  to the container. So the launching process (between fork and exec) enters a mount namespace of
  its own (a slave of the host's: mounts made there never reach the host), mounts a tmpfs on the
  run folder's `container/` directory and writes the tree there: empty mount points, the
  usr-merge symlinks, /etc with the compartment's passwd/group/hosts/hostname and resolv.conf,
  the agent and the programs of qnix/inside, a home for a disposable, and the secrets, copied
  straight from their memfds. Nothing of it is ever on a disk, and it is gone with the last
  process of the container; nspawn's own run-time files (/run/systemd/nspawn) go to a second
  private tmpfs, so none are left on the host either.
* **User namespace:** the container's uid (and gid) 0..1000 are host uids H-1000..H, where H is
  the compartment's own host uid (names.host_id, as for the namespace backend): the user inside
  (uid 1000) is H, so its home, agent socket and call socket keep the owner they have for a
  namespace compartment, and qnix checks the same uid at the agent socket. Only nspawn's setup
  runs as the container's root (H-1000): the first process is qnix's own init, as the user (no
  --as-pid2 stub init, which would stay root), so once it runs every process inside is H.
  `--private-users-ownership=off`: nothing is chowned; the tree is root's, which inside is the
  unmapped `nobody`, read-only for the user.
* **No nested user namespaces:** once the agent is up, the keeper sets user.max_user_namespaces
  to 0 inside the container's user namespace (bubblewrap's --disable-userns), before any
  command of the compartment can run.
* **Network:** the launcher enters the compartment's network namespace before nspawn starts and
  nspawn shares it (no --private-network). `--network-namespace-path=` cannot be used with a
  private user namespace: nspawn 252 joins it from inside the new user namespace, where it has
  no rights over a namespace the host made ("Operation not permitted").
* **Cgroups:** the launcher enters the compartment's cgroup (memory and pids limits) and, where
  systemd's controller has a hierarchy of its own (cgroup v1 name=systemd, a hybrid host's
  cgroup2), `qnix/<name>` there too: with --keep-unit nspawn puts itself and the container into
  `supervisor` and `payload` sub-cgroups of the cgroup it starts in, which are so always below
  the compartment's own and never in a cgroup shared with anything else. `cgroup_tree` lists
  all of it, deepest first, for killing and removing.
* **No systemd as PID 1, no machined:** --register=no and --keep-unit (no machine registration,
  no scope unit, no bus); --console=pipe hands the agent the launcher's stdout, where it prints
  "ready".
* **PID 1** is container_init.py (standard library only, copied into the tree): it starts the
  agent, reaps every orphan, passes SIGTERM on and ends with the agent. It runs under
  `setpriv --pdeathsig KILL`, so that when nspawn dies (and nspawn dies with the keeper:
  PR_SET_PDEATHSIG) the container dies with it, as bubblewrap's --die-with-parent does.
* **Privileges:** --user (uid 1000), --no-new-privileges, --drop-capability=all, a read-only
  root, and a system call filter refusing at least what qnix.runtime.seccomp refuses plus
  ptrace and process_vm_readv/writev (nspawn's own allow-list, which depends on the capabilities
  kept, applies under it: without CAP_SYS_PTRACE it refuses ptrace too, but not
  process_vm_readv/writev).

`nspawn_argv` and `tree_steps` are pure, so a compartment's whole command line and tree can be
checked exactly; `prepare` fills them in from a plan, `launch` starts the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qnix.errors import QnixError
from qnix.runtime import cgroups, seccomp, secrets
from qnix.runtime.backends import namespace as ns
from qnix.runtime.runner import require_tool
from qnix.spec.model import COMPARTMENT_NAME_RE, UNIX_USER_RE

log = logging.getLogger("qnix.run")

ISOLATION = "container"
# The user inside, as for the namespace backend.
INSIDE_UID = 1000
# The container's uids 0..INSIDE_UID: its root (nspawn's setup) and the user.
USERNS_SIZE = INSIDE_UID + 1
# Under the run folder: the mount point of the launcher's private tmpfs.
STAGING_NAME = "container"
# nspawn keeps its locks and per-machine folders here; the launcher gives it a private tmpfs.
NSPAWN_RUN_DIR = "/run/systemd/nspawn"
# nspawn's --user looks the user up by running getent inside the container, from one of these.
GETENT_PATHS = ("/usr/bin/getent", "/bin/getent")
# PID 1 inside: qnix's init (a lone file, standard library only) and where it is put.
INIT_SOURCE = Path(__file__).with_name("container_init.py")
INIT_INSIDE = "/opt/qnix-container/init.py"
# Where the host's os-release may be: nspawn refuses a tree without one.
OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
# Refused on top of qnix.runtime.seccomp's list: no debugging across processes in a container.
# nspawn's allow-list refuses ptrace as well (no CAP_SYS_PTRACE is kept), but admits the other two.
EXTRA_DENIED_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev")
DENIED_SYSCALLS = (*seccomp.DENIED_SYSCALLS, *EXTRA_DENIED_SYSCALLS)
SYSCALL_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# A machine name (nspawn: a valid host name): here always a cgroup name.
MACHINE_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

# ---- directives: one systemd-nspawn option each -------------------------------------------------
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

# ---- the root tree ------------------------------------------------------------------------------


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


# ---- the command line ---------------------------------------------------------------------------


def userns_base(host_uid: int) -> int:
    """The host uid of the container's root: the user inside (INSIDE_UID) is `host_uid`."""
    return host_uid - INSIDE_UID


def nspawn_argv(
    plan: ns.SandboxPlan,
    command: Sequence[str],
    *,
    layout: Layout,
    host_uid: int,
    machine: str,
    system: Sequence[ns.Directive],
    with_secrets: bool,
    nspawn: str = "systemd-nspawn",
) -> list[str]:
    """The systemd-nspawn command line that runs `command` as compartment `plan`, as host uid
    `host_uid` inside; `system` is what it sees of the host (ns.host_system_binds)."""
    if not command or not all(isinstance(arg, str) and arg for arg in command):
        raise ValueError("command must be a non-empty list of non-empty strings")
    if plan.uid != INSIDE_UID or plan.gid != INSIDE_UID:
        raise ValueError(f"a container's user is uid and gid {INSIDE_UID}")
    env = [
        SetEnv("HOME", plan.home_inside),
        SetEnv("USER", plan.user),
        SetEnv("LOGNAME", plan.user),
        SetEnv("SHELL", "/bin/sh"),
        SetEnv("PATH", ns.DEFAULT_PATH),
        SetEnv("LANG", "C.UTF-8"),
        SetEnv("XDG_RUNTIME_DIR", plan.runtime_dir),
        *(SetEnv(key, value) for key, value in plan.env),
    ]
    home = plan.home_inside
    mounts: list[Directive] = [
        *(RoBind(d.src, d.dst) for d in system if isinstance(d, ns.RoBind)),
        Bind(str(plan.home) if plan.home is not None else layout.home, home),
        Bind(layout.runtime_dir, plan.runtime_dir),
        Tmpfs("/var/tmp", 0o1777),  # noqa: S108 - inside the container: its own tmpfs
        *(RoBind(src, dst) for src, dst in plan.extra_ro_binds),
        *(Bind(src, dst) for src, dst in plan.extra_binds),
    ]
    if with_secrets:
        mounts.append(RoBind(layout.secrets, secrets.SECRETS_INSIDE))
    directives: list[Directive] = [
        Directory(layout.root),
        Machine(machine),
        Hostname(plan.name),
        PrivateUsers(userns_base(host_uid), USERNS_SIZE),
        User(plan.user),
        Chdir(home),
        SystemCallFilter(DENIED_SYSCALLS),
        *env,
        *mounts,
    ]
    argv = [nspawn, *FIXED_OPTIONS]
    for directive in directives:
        argv += directive.argv()
    return [*argv, "--", *command]


# ---- preparing -----------------------------------------------------------------------------------


def _host_os_release(root: Path) -> bytes:
    for path in OS_RELEASE_PATHS:
        with contextlib.suppress(OSError):
            return (root / path.lstrip("/")).read_bytes()
    return b"ID=linux\n"


def require_getent(system: Sequence[ns.Directive], root: Path = Path("/")) -> None:
    """nspawn's --user runs /usr/bin/getent or /bin/getent inside: one must be visible there."""
    visible = {d.dst for d in system if isinstance(d, ns.RoBind)}
    visible |= {d.link for d in system if isinstance(d, ns.Symlink)}
    for path in GETENT_PATHS:
        top = "/" + path.split("/")[1]
        if top in visible and (root / path.lstrip("/")).exists():
            return
    raise QnixError(
        "systemd-nspawn looks a container's user up with /usr/bin/getent or /bin/getent, and "
        "this host has neither",
        hint='install the C library\'s tools (libc-bin), or use isolation = "namespace"',
    )


@dataclass(frozen=True, slots=True)
class PreparedContainer:
    """A systemd-nspawn command line and the tree its launcher writes first."""

    argv: list[str]
    steps: tuple[Step, ...]
    layout: Layout


def require_setpriv() -> str:
    """setpriv (util-linux), which the container's first process runs under; it must lie where
    the container sees the host's system."""
    found = os.path.realpath(require_tool("setpriv", "util-linux"))
    if not found.startswith(("/usr/", "/nix/store/")):
        raise QnixError(
            f"setpriv is at {found}, which a container does not see",
            hint="install util-linux from the distribution (/usr/bin/setpriv)",
        )
    return found


def prepare(
    plan: ns.SandboxPlan,
    command: Sequence[str],
    *,
    staging: Path,
    host_uid: int,
    machine: str,
    system: Sequence[ns.Directive] | None = None,
    files: Mapping[str, bytes | int] | None = None,
    secret_files: Mapping[str, int] | None = None,
    nspawn: str | None = None,
    init_interpreter: str | None = None,
) -> PreparedContainer:
    """nspawn_argv and tree_steps for `plan` on this host, `host_uid` its uid and gid. The
    container's first process is `setpriv --pdeathsig KILL`, then qnix's init run by
    `init_interpreter`, which starts `command` (without an interpreter, `command` is PID 1
    itself: tests show what the init is for)."""
    nspawn = nspawn if nspawn is not None else require_tool("systemd-nspawn", "systemd-container")
    system = ns.host_system_binds() if system is None else system
    require_getent(system)
    layout = Layout(str(staging))
    files = dict(files or {})
    if init_interpreter is not None:
        files[INIT_INSIDE] = INIT_SOURCE.read_bytes()
        command = [init_interpreter, "-I", "-S", INIT_INSIDE, *command]
    command = [require_setpriv(), "--pdeathsig", "KILL", "--", *command]
    steps = tree_steps(
        plan,
        layout,
        host_uid=host_uid,
        system=system,
        files=files,
        secret_files=secret_files or {},
        os_release=_host_os_release(Path("/")),
    )
    argv = nspawn_argv(
        plan,
        command,
        layout=layout,
        host_uid=host_uid,
        machine=machine,
        system=system,
        with_secrets=bool(secret_files),
        nspawn=nspawn,
    )
    return PreparedContainer(argv, steps, layout)


# ---- cgroups -------------------------------------------------------------------------------------


def systemd_hierarchies(mounts: Path = cgroups.MOUNTS) -> tuple[Path, ...]:
    """Where systemd's own controller lives: a cgroup2 mount (the only hierarchy on a v2 host,
    `unified` on a hybrid one) and a v1 name=systemd mount."""
    found: list[Path] = []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        systemd = fields[2] == "cgroup2" or (fields[2] == "cgroup" and "name=systemd" in fields[3])
        if systemd and mountpoint not in found:
            found.append(mountpoint)
    return tuple(found)


def _extra_paths(cgroup: cgroups.Cgroup, mounts: Path) -> tuple[Path, ...]:
    """qnix/<name> in each systemd hierarchy that does not already hold the cgroup."""
    own = {path.parent.parent for path in cgroup.paths}
    return tuple(
        hierarchy / cgroups.QNIX_DIR / cgroup.name
        for hierarchy in systemd_hierarchies(mounts)
        if hierarchy not in own
    )


def placement(cgroup: cgroups.Cgroup, mounts: Path = cgroups.MOUNTS) -> cgroups.Cgroup:
    """The cgroup a container is launched into: the compartment's, plus qnix/<name> in the
    systemd hierarchies (made here), so that nspawn's sub-cgroups land below it."""
    extra = _extra_paths(cgroup, mounts)
    for path in extra:
        path.mkdir(parents=True, exist_ok=True)
    return cgroups.Cgroup(cgroup.name, (*cgroup.paths, *extra))


def cgroup_tree(cgroup: cgroups.Cgroup, mounts: Path = cgroups.MOUNTS) -> cgroups.Cgroup:
    """Every folder of a compartment's cgroups, deepest first: its own, qnix/<name> in the
    systemd hierarchies, and every sub-cgroup of them (nspawn's payload and supervisor).
    cgroups.kill and cgroups.remove over it leave nothing; for a namespace compartment it is
    just its cgroup."""
    tops = [*cgroup.paths, *(p for p in _extra_paths(cgroup, mounts) if p.is_dir())]
    found: list[Path] = []
    for top in tops:
        found += _descendants(top)
        found.append(top)
    return cgroups.Cgroup(cgroup.name, tuple(found))


def _descendants(top: Path) -> list[Path]:
    """Sub-folders of `top`, each before its parent."""
    below: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                below += _descendants(Path(entry.path))
                below.append(Path(entry.path))
    return below


# ---- launching -----------------------------------------------------------------------------------

# nspawn's whole environment, never the caller's: nspawn obeys SYSTEMD_* variables that turn
# protections off (SYSTEMD_SECCOMP=0 drops its filter, SYSTEMD_NSPAWN_API_VFS_WRITABLE=1 makes
# /sys writable) and passes LISTEN_FDS descriptors on into the container.
NSPAWN_ENV: Mapping[str, str] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# Socket activation (sd_listen_fds): the one descriptor nspawn passes into the container, the
# agent's socket, is at 3, and LISTEN_PID must be nspawn's own pid.
LISTEN_FDS_START = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV = 0x2, 0x4
MS_REC, MS_SLAVE = 0x4000, 1 << 19
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount_tmpfs(target: str, mode: int) -> None:
    options = f"mode={mode:04o}".encode()
    _check(
        _libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
        f"mount tmpfs on {target}",
    )


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


def _in_child(
    netns_fd: int | None,
    procs_fds: Sequence[int],
    layout: Layout,
    steps: Sequence[Step],
    env: Mapping[str, str],
    listening: bool,
) -> Callable[[], None]:
    """What the new process does before it becomes nspawn: enter the network namespace and the
    cgroups, die with its parent, enter a mount namespace of its own that receives the host's
    mounts but sends none back, mount the private tmpfs and write the tree; last, set nspawn's
    whole environment, with the socket activation variables that name its own pid."""

    def child() -> None:
        try:
            if netns_fd is not None:
                _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns")
            pid = str(os.getpid()).encode()
            for fd in procs_fds:
                os.write(fd, pid)
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            _check(_libc.unshare(CLONE_NEWNS), "unshare")
            _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave")
            _mount_tmpfs(layout.staging, 0o755)
            _mount_tmpfs(NSPAWN_RUN_DIR, 0o755)
            write_tree(steps)
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
            # Popen runs nspawn with this process's own environment (env=None).
            os.environ.clear()
            os.environ.update(env)
            if listening:
                os.environ.update({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())})
        except BaseException as exc:
            # The launcher's stderr (the keeper's log): subprocess only says preexec_fn failed.
            os.write(2, f"qnix: cannot set up the container: {exc}\n".encode(errors="replace"))
            raise

    return child


_Stream = int | IO[Any] | None


@contextlib.contextmanager
def _opened(
    netns_path: str | None, cgroup: cgroups.Cgroup
) -> Iterator[tuple[int | None, list[int]]]:
    opened: list[int] = []
    try:
        netns = None
        if netns_path is not None:
            netns = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(netns)
        procs = []
        for path in cgroup.procs_files:
            procs.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            opened.append(procs[-1])
    except OSError as exc:
        for fd in opened:
            os.close(fd)
        raise QnixError(
            f"cannot open {exc.filename}: {exc.strerror}",
            hint="is the compartment's network namespace (or cgroup) set up? qnix needs root",
        ) from exc
    try:
        yield netns, procs
    finally:
        for fd in opened:
            os.close(fd)


@contextlib.contextmanager
def _at_listen_fds_start(listen_fd: int | None) -> Iterator[None]:
    """`listen_fd` at LISTEN_FDS_START while nspawn is started, whatever was there put back
    after (the keeper starts one container at a time, from one thread)."""
    if listen_fd is None:
        yield
        return
    try:
        saved: int | None = os.dup(LISTEN_FDS_START)
        was_inheritable = os.get_inheritable(LISTEN_FDS_START)
    except OSError:
        saved, was_inheritable = None, False
    os.dup2(listen_fd, LISTEN_FDS_START, inheritable=False)
    try:
        yield
    finally:
        if saved is None:
            os.close(LISTEN_FDS_START)
        else:
            os.dup2(saved, LISTEN_FDS_START, inheritable=was_inheritable)
            os.close(saved)


def launch(
    prepared: PreparedContainer,
    *,
    netns_path: str | None,
    cgroup: cgroups.Cgroup,
    listen_fd: int | None = None,
    env: Mapping[str, str] = NSPAWN_ENV,
    stdin: _Stream = subprocess.DEVNULL,
    stdout: _Stream = None,
    stderr: _Stream = None,
) -> subprocess.Popen[bytes]:
    """Start `prepared` in the network namespace at `netns_path` and in `cgroup` (extended by
    `placement`), with its tree in a private tmpfs on its staging folder (made here, root's,
    0700). Only stdio and `listen_fd` (the agent's bound socket, which nspawn passes into the
    container by socket activation, at LISTEN_FDS_START) are inherited: nspawn would pass any
    other descriptor in too; `env` is nspawn's whole environment (its SYSTEMD_* variables
    weaken it: tests only).
    Like namespace.launch, one of the few places qnix starts a long-running process itself."""
    staging = Path(prepared.layout.staging)
    staging.mkdir(mode=0o700, exist_ok=True)
    Path(NSPAWN_RUN_DIR).mkdir(mode=0o755, parents=True, exist_ok=True)
    where = placement(cgroup)
    log.debug("$ %s", shlex.join(prepared.argv))
    with _opened(netns_path, where) as (netns, procs), _at_listen_fds_start(listen_fd):
        try:
            return subprocess.Popen(
                prepared.argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=None,  # set by the child itself, with LISTEN_PID
                close_fds=True,
                pass_fds=() if listen_fd is None else (LISTEN_FDS_START,),
                preexec_fn=_in_child(
                    netns, procs, prepared.layout, prepared.steps, env, listen_fd is not None
                ),
            )
        except subprocess.SubprocessError as exc:
            raise QnixError(
                f"could not start {prepared.argv[0]}: setting up its namespaces, cgroups or "
                "tree failed (the keeper's log says which)",
                hint="qnix needs root to enter a network namespace and a cgroup",
            ) from exc
        except FileNotFoundError as exc:
            raise QnixError(
                f"command not found: {prepared.argv[0]}",
                hint="install systemd-nspawn: apt-get install systemd-container",
            ) from exc


# ---- after the start ----------------------------------------------------------------------------


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def first_process(nspawn_pid: int) -> int:
    """The container's PID 1 (as the host numbers it): nspawn's child in another user
    namespace."""
    own = os.stat("/proc/self/ns/user").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _parent_of(entry) != nspawn_pid:
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/user").st_ino != own:
                return int(entry)
    raise QnixError(f"systemd-nspawn (pid {nspawn_pid}) has no container process")


def forbid_user_namespaces(nspawn_pid: int) -> None:
    """Set user.max_user_namespaces to 0 inside the container's user namespace, so nothing in
    it can make another (the kernel counts a nested namespace against every ancestor's limit).
    A forked child joins the namespace: the caller keeps its own credentials."""
    userns = os.open(f"/proc/{first_process(nspawn_pid)}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:
            code = 1
            try:
                _check(_libc.setns(userns, CLONE_NEWUSER), "setns")
                limit = os.open("/proc/sys/user/max_user_namespaces", os.O_WRONLY)
                os.write(limit, b"0")
                os.close(limit)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(userns)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise QnixError("could not forbid user namespaces inside the container")
