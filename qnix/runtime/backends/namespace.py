"""The namespace backend: a compartment is a bubblewrap sandbox.

bubblewrap gets new user, mount, pid, ipc, uts and cgroup namespaces (never a network one: the
launcher starts it inside the compartment's own network namespace), drops every capability,
sets no_new_privs, forbids further user namespaces and loads the compartment seccomp filter
just before the compartment's first program runs. The file system inside is built from small
directives (bubblejail's idea): the host's /usr (or /nix/store) and a few /etc files read-only,
a generated passwd/group/hosts, private /tmp, /run, /dev and /proc, and a home that is the
compartment's state directory or, for a disposable, a tmpfs.

`bwrap_argv` is pure, so a plan's whole command line can be checked exactly; `prepare` adds the
file descriptors it refers to and `launch` starts it in the network namespace and cgroup.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from qnix.errors import QnixError
from qnix.runner import require_tool
from qnix.runtime import seccomp
from qnix.runtime.cgroups import Cgroup
from qnix.runtime.netlink import CLONE_NEWNET
from qnix.spec.model import COMPARTMENT_NAME_RE, UNIX_USER_RE

log = logging.getLogger("qnix.run")

# ---- directives: one bubblewrap option each ---------------------------------------------------


def check_path(path: str, what: str) -> str:
    """`path` if it is absolute and normalized (the backends' directives take no other)."""
    if not path.startswith("/") or "\0" in path or os.path.normpath(path) != path:
        raise ValueError(f"{what} must be an absolute, normalized path: {path!r}")
    return path


def _perms(mode: int | None) -> list[str]:
    return [] if mode is None else ["--perms", f"{mode:04o}"]


@dataclass(frozen=True, slots=True)
class BindPaths:
    """What every bind directive holds: a source shown at a destination, both checked."""

    src: str
    dst: str

    def __post_init__(self) -> None:
        check_path(self.src, "bind source")
        check_path(self.dst, "bind destination")


@dataclass(frozen=True, slots=True)
class RoBind(BindPaths):
    def argv(self) -> list[str]:
        return ["--ro-bind", self.src, self.dst]


@dataclass(frozen=True, slots=True)
class Bind(BindPaths):
    def argv(self) -> list[str]:
        return ["--bind", self.src, self.dst]


@dataclass(frozen=True, slots=True)
class Tmpfs:
    dst: str
    mode: int | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        check_path(self.dst, "tmpfs mount point")

    def argv(self) -> list[str]:
        size = [] if self.size is None else ["--size", str(self.size)]
        return [*_perms(self.mode), *size, "--tmpfs", self.dst]


@dataclass(frozen=True, slots=True)
class Proc:
    dst: str = "/proc"

    def argv(self) -> list[str]:
        return ["--proc", check_path(self.dst, "proc mount point")]


@dataclass(frozen=True, slots=True)
class Dev:
    dst: str = "/dev"

    def argv(self) -> list[str]:
        return ["--dev", check_path(self.dst, "dev mount point")]


@dataclass(frozen=True, slots=True)
class Dir:
    dst: str
    mode: int | None = None

    def __post_init__(self) -> None:
        check_path(self.dst, "directory")

    def argv(self) -> list[str]:
        return [*_perms(self.mode), "--dir", self.dst]


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str
    link: str

    def __post_init__(self) -> None:
        check_path(self.link, "symlink")
        if not self.target or "\0" in self.target:
            raise ValueError(f"invalid symlink target {self.target!r}")

    def argv(self) -> list[str]:
        return ["--symlink", self.target, self.link]


@dataclass(frozen=True, slots=True)
class RoData:
    """A read-only file inside whose content bubblewrap reads from an inherited descriptor."""

    fd: int
    dst: str
    mode: int | None = 0o444

    def __post_init__(self) -> None:
        check_path(self.dst, "file")

    def argv(self) -> list[str]:
        return [*_perms(self.mode), "--ro-bind-data", str(self.fd), self.dst]


@dataclass(frozen=True, slots=True)
class RemountRo:
    dst: str

    def argv(self) -> list[str]:
        return ["--remount-ro", check_path(self.dst, "mount point")]


ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class SetEnv:
    key: str
    value: str

    def __post_init__(self) -> None:
        if not ENV_KEY_RE.fullmatch(self.key) or "\0" in self.value:
            raise ValueError(f"invalid environment variable {self.key!r}")

    def argv(self) -> list[str]:
        return ["--setenv", self.key, self.value]


@dataclass(frozen=True, slots=True)
class Hostname:
    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(COMPARTMENT_NAME_RE, self.name):
            raise ValueError(f"invalid hostname {self.name!r}")

    def argv(self) -> list[str]:
        return ["--hostname", self.name]


@dataclass(frozen=True, slots=True)
class Chdir:
    path: str

    def argv(self) -> list[str]:
        return ["--chdir", check_path(self.path, "working directory")]


Directive = (
    RoBind
    | Bind
    | Tmpfs
    | Proc
    | Dev
    | Dir
    | Symlink
    | RoData
    | RemountRo
    | SetEnv
    | Hostname
    | Chdir
)

# ---- what the compartment sees of the host --------------------------------------------------

# Top-level entries that are symlinks into /usr on a merged-/usr system, directories elsewhere.
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The /etc pieces programs need to run: the dynamic linker's cache, alternatives, certificates,
# time zone, fonts, name-service configuration, locale, MIME, XDG defaults; NixOS keeps the
# targets of its /etc symlinks in /etc/static. Never the credentials (shadow, gshadow, sudoers,
# ssh), never the host's identity (machine-id, hostname) and never passwd/group/hosts, which
# are generated for the compartment; resolv.conf belongs to the network layer.
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "crypto-policies",
    "fonts",
    "gai.conf",
    "host.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.conf",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "pki",
    "protocols",
    "services",
    "ssl",
    "static",
    "timezone",
    "xdg",
)
# NixOS: the store, and the symlinks into it that stand for the running system.
NIX_STORE = "nix/store"
NIX_RUN_LINKS = ("run/current-system", "run/opengl-driver", "run/booted-system")
# Prefixes already visible through the binds above: an interpreter under them needs no bind.
_SYSTEM_PREFIXES = ("/usr", "/nix/store")
_BASE_PREFIX = os.path.realpath(sys.base_prefix)


def _mirror(root: Path, relative: str) -> Directive | None:
    """The host entry `/relative` as it is: a symlink stays a symlink, anything else a ro-bind."""
    path = root / relative
    if path.is_symlink():
        return Symlink(os.readlink(path), "/" + relative)
    if path.exists():
        return RoBind(str(path), "/" + relative)
    return None


def host_system_binds(
    root: Path = Path("/"), interpreter_prefix: str | None = _BASE_PREFIX
) -> tuple[Directive, ...]:
    """What a compartment sees of the host's system, read-only, as found under `root`.

    `interpreter_prefix` (by default the running Python's) is bound too when it lies outside
    /usr and /nix/store, so the agent can run with the interpreter that started qnix.
    """
    found: list[Directive | None] = [_mirror(root, "usr")]
    found += [_mirror(root, name) for name in TOP_LEVEL]
    found += [_mirror(root, f"etc/{name}") for name in ETC_ENTRIES]
    if (root / NIX_STORE).is_dir():
        found.append(RoBind(str(root / NIX_STORE), "/" + NIX_STORE))
    found += [_mirror(root, name) for name in NIX_RUN_LINKS]
    if interpreter_prefix is not None and not any(
        interpreter_prefix == p or interpreter_prefix.startswith(p + "/") for p in _SYSTEM_PREFIXES
    ):
        found.append(RoBind(interpreter_prefix, interpreter_prefix))
    return tuple(d for d in found if d is not None)


# ---- the plan ---------------------------------------------------------------------------------

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin"
# Destinations a bind may not cover: they hold what the sandbox itself provides.
_RESERVED_DESTINATIONS = (
    "/",
    "/proc",
    "/dev",
    *(f"/etc/{n}" for n in ("passwd", "group", "hosts", "hostname")),
)


def _check_destination(dst: str) -> None:
    check_path(dst, "bind destination")
    if dst in _RESERVED_DESTINATIONS or dst.startswith(("/proc/", "/dev/")):
        raise ValueError(f"a bind may not cover {dst}")


@dataclass(frozen=True, slots=True)
class SandboxPlan:
    """Everything that differs between two namespace compartments."""

    name: str  # the compartment's name, also its hostname
    home: Path | None  # host directory bound at /home/<user>; None: a tmpfs (disposable)
    user: str  # the user name inside
    uid: int = 1000
    gid: int = 1000
    extra_ro_binds: tuple[tuple[str, str], ...] = ()  # (host path, path inside)
    extra_binds: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(COMPARTMENT_NAME_RE, self.name):
            raise ValueError(f"invalid compartment name {self.name!r}")
        if not re.fullmatch(UNIX_USER_RE, self.user) or self.user == "root":
            raise ValueError(f"invalid user name {self.user!r}")
        for number in (self.uid, self.gid):
            # 0 would be root inside; 65534 is the kernel's overflow id for unmapped owners.
            if not 0 < number < 65534:
                raise ValueError(f"uid/gid {number} must be between 1 and 65533")
        if self.home is not None:
            check_path(str(self.home), "home")
        for src, dst in (*self.extra_ro_binds, *self.extra_binds):
            check_path(src, "bind source")
            _check_destination(dst)
        for key, value in self.env:
            SetEnv(key, value)

    @property
    def home_inside(self) -> str:
        return f"/home/{self.user}"

    @property
    def runtime_dir(self) -> str:
        return f"/run/user/{self.uid}"


def identity_files(plan: SandboxPlan) -> dict[str, bytes]:
    """passwd, group, hosts and hostname for inside: the compartment's user and nothing of the
    host's (the host's passwd would list every account on the machine)."""
    user, uid, gid = plan.user, plan.uid, plan.gid
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{user}:x:{uid}:{gid}:{user}:{plan.home_inside}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{user}:x:{gid}:\nnobody:x:65534:\n"
    hosts = f"127.0.0.1\tlocalhost {plan.name}\n::1\tlocalhost {plan.name}\n"
    return {
        "/etc/passwd": passwd.encode(),
        "/etc/group": group.encode(),
        "/etc/hosts": hosts.encode(),
        "/etc/hostname": f"{plan.name}\n".encode(),
    }


def bwrap_argv(
    plan: SandboxPlan,
    command: Sequence[str],
    *,
    seccomp_fd: int | None,
    file_fds: Mapping[str, int] | None = None,
    system: Sequence[Directive] | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """The bubblewrap command line that runs `command` as compartment `plan`.

    `seccomp_fd` reads the filter program (None: no filter, for tests' control runs only);
    `file_fds` maps generated files (see identity_files) to descriptors holding their content;
    `system` defaults to host_system_binds().
    """
    if not command or not all(isinstance(arg, str) and arg for arg in command):
        raise ValueError("command must be a non-empty list of non-empty strings")
    system = host_system_binds() if system is None else system
    env = [
        SetEnv("HOME", plan.home_inside),
        SetEnv("USER", plan.user),
        SetEnv("LOGNAME", plan.user),
        SetEnv("SHELL", "/bin/sh"),
        SetEnv("PATH", DEFAULT_PATH),
        SetEnv("LANG", "C.UTF-8"),
        SetEnv("XDG_RUNTIME_DIR", plan.runtime_dir),
        *(SetEnv(key, value) for key, value in plan.env),
    ]
    home: Directive = (
        Tmpfs(plan.home_inside, mode=0o700)
        if plan.home is None
        else Bind(str(plan.home), plan.home_inside)
    )
    directives: list[Directive] = [
        Hostname(plan.name),
        *env,
        # Mount points inside the sandbox, each a fresh tmpfs: not the host's temp directories.
        Tmpfs("/tmp", mode=0o1777),  # noqa: S108
        Tmpfs("/var/tmp", mode=0o1777),  # noqa: S108
        Tmpfs("/run", mode=0o755),
        Dir(plan.runtime_dir, mode=0o700),
        *system,
        *(RoData(fd, dst) for dst, fd in sorted((file_fds or {}).items())),
        Proc("/proc"),
        Dev("/dev"),
        home,
        *(RoBind(src, dst) for src, dst in plan.extra_ro_binds),
        *(Bind(src, dst) for src, dst in plan.extra_binds),
        # The root itself is bubblewrap's tmpfs: nothing inside may add files beside the mounts.
        RemountRo("/"),
        Chdir(plan.home_inside),
    ]
    # No --unshare-net: the launcher starts bubblewrap inside the compartment's own network
    # namespace. No --as-pid-1: bubblewrap's pid 1 reaps orphans, so the agent need not.
    argv = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--disable-userns",
        "--uid",
        str(plan.uid),
        "--gid",
        str(plan.gid),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
    ]
    for directive in directives:
        argv += directive.argv()
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, "--", *command]


# ---- file descriptors and launching ----------------------------------------------------------


def sealed_memfd(data: bytes, name: str) -> int:
    """A memfd holding `data`, sealed against any change, positioned at its start.

    Close-on-exec: pass it explicitly (pass_fds) to the one process that should read it.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class PreparedSandbox:
    """A bubblewrap command line and the descriptors it reads; close them once it has started."""

    argv: list[str]
    fds: tuple[int, ...]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = ()

    def __enter__(self) -> PreparedSandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def prepare(
    plan: SandboxPlan,
    command: Sequence[str],
    *,
    with_seccomp: bool = True,
    system: Sequence[Directive] | None = None,
    bwrap: str | None = None,
) -> PreparedSandbox:
    """bwrap_argv with real descriptors for the seccomp program and the generated files."""
    bwrap = bwrap if bwrap is not None else require_tool("bwrap", "bubblewrap")
    fds: list[int] = []
    try:
        seccomp_fd = None
        if with_seccomp:
            seccomp_fd = sealed_memfd(seccomp.compartment_filter_bpf(), "qnix-seccomp")
            fds.append(seccomp_fd)
        file_fds: dict[str, int] = {}
        for dst, data in identity_files(plan).items():
            file_fds[dst] = sealed_memfd(data, "qnix" + dst.replace("/", "-"))
            fds.append(file_fds[dst])
        argv = bwrap_argv(
            plan, command, seccomp_fd=seccomp_fd, file_fds=file_fds, system=system, bwrap=bwrap
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return PreparedSandbox(argv, tuple(fds))


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """The unprivileged host account a compartment's bubblewrap runs as."""

    uid: int
    gid: int


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38


def _in_child(
    netns_fd: int | None, procs_fds: Sequence[int], run_as: HostIdentity | None
) -> Callable[[], None]:
    """What the new process does between fork and exec, in this order: enter the network
    namespace and the cgroup (both need root), give up root, set no_new_privs (bubblewrap
    sets it too; this makes it hold whatever bubblewrap version runs)."""

    def child() -> None:
        if netns_fd is not None and _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        pid = str(os.getpid()).encode()
        for fd in procs_fds:
            os.write(fd, pid)
        if run_as is not None:
            os.setgroups([])
            os.setresgid(run_as.gid, run_as.gid, run_as.gid)
            os.setresuid(run_as.uid, run_as.uid, run_as.uid)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")

    return child


_Stream = int | IO[Any] | None


@dataclass(frozen=True, slots=True)
class OpenedTargets:
    """A network namespace and the cgroup.procs files a new process enters, opened."""

    netns: int | None
    procs: tuple[int, ...]


def open_targets(netns_path: str | None, cgroup: Cgroup | None) -> OpenedTargets:
    """Open the namespace and cgroup files here, so a wrong path fails with a clear error
    before any process exists."""
    opened: list[int] = []
    try:
        netns = None
        if netns_path is not None:
            netns = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(netns)
        procs: list[int] = []
        for path in cgroup.procs_files if cgroup is not None else ():
            procs.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            opened.append(procs[-1])
    except OSError as exc:
        for fd in opened:
            os.close(fd)
        raise QnixError(
            f"cannot open {exc.filename}: {exc.strerror}",
            hint="is the compartment's network namespace (or cgroup) set up? qnix needs root",
        ) from exc
    return OpenedTargets(netns, tuple(procs))


def launch(
    argv: Sequence[str],
    *,
    netns_path: str | None,
    cgroup: Cgroup | None,
    pass_fds: Sequence[int] = (),
    run_as: HostIdentity | None = None,
    env: Mapping[str, str] | None = None,
    stdin: _Stream = subprocess.DEVNULL,
    stdout: _Stream = None,
    stderr: _Stream = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` (a bubblewrap command line) in the network namespace at `netns_path`, inside
    `cgroup`, as `run_as` (None: as the caller), with no_new_privs set.

    Only `pass_fds` are inherited. This is the one place qnix starts a long-running process
    rather than going through runner.run, which waits for its command to finish.
    """
    opened = open_targets(netns_path, cgroup)
    log.debug("$ %s", shlex.join(argv))
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            preexec_fn=_in_child(opened.netns, opened.procs, run_as),
        )
    except subprocess.SubprocessError as exc:
        raise QnixError(
            f"could not start {argv[0]}: entering the network namespace or cgroup, or dropping "
            "privileges, failed",
            hint="qnix needs root to enter a network namespace and a cgroup, and a valid host "
            "user to run a compartment as",
        ) from exc
    except FileNotFoundError as exc:
        raise QnixError(f"command not found: {argv[0]}", hint="is bubblewrap installed?") from exc
    finally:
        for fd in (opened.netns, *opened.procs):
            if fd is not None:
                os.close(fd)
