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
checked exactly; `prepare` fills them in from a plan, `launch` starts the result. Each job has a
module of its own — container_options (one nspawn option each), container_tree (the root tree),
container_cgroups, container_launch — and this one, the command line and `prepare`, is where
callers find all of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from qnix.errors import QnixError
from qnix.runner import require_tool
from qnix.runtime import seccomp, secrets
from qnix.runtime.backends import namespace as ns
from qnix.runtime.backends.container_cgroups import cgroup_tree, placement, systemd_hierarchies
from qnix.runtime.backends.container_launch import (
    LISTEN_FDS_START,
    NSPAWN_ENV,
    NSPAWN_RUN_DIR,
    PreparedContainer,
    forbid_user_namespaces,
    launch,
)
from qnix.runtime.backends.container_options import (
    FIXED_OPTIONS,
    Bind,
    Chdir,
    Directive,
    Directory,
    Hostname,
    Machine,
    PrivateUsers,
    RoBind,
    SetEnv,
    SystemCallFilter,
    Tmpfs,
    User,
)
from qnix.runtime.backends.container_tree import (
    Layout,
    MakeDir,
    MakeLink,
    WriteFile,
    tree_steps,
)

# The backend's surface as callers know it, whichever module below defines each name.
__all__ = [
    "DENIED_SYSCALLS",
    "ISOLATION",
    "LISTEN_FDS_START",
    "NSPAWN_ENV",
    "NSPAWN_RUN_DIR",
    "STAGING_NAME",
    "Bind",
    "Chdir",
    "Directory",
    "Hostname",
    "Layout",
    "Machine",
    "MakeDir",
    "MakeLink",
    "PreparedContainer",
    "PrivateUsers",
    "RoBind",
    "SetEnv",
    "SystemCallFilter",
    "Tmpfs",
    "User",
    "WriteFile",
    "cgroup_tree",
    "forbid_user_namespaces",
    "launch",
    "nspawn_argv",
    "placement",
    "prepare",
    "require_getent",
    "systemd_hierarchies",
    "tree_steps",
]

ISOLATION = "container"
# The user inside, as for the namespace backend.
INSIDE_UID = 1000
# The container's uids 0..INSIDE_UID: its root (nspawn's setup) and the user.
USERNS_SIZE = INSIDE_UID + 1
# Under the run folder: the mount point of the launcher's private tmpfs.
STAGING_NAME = "container"
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
