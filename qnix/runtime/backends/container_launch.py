"""Starting a prepared container: the launcher (between fork and exec) enters the network
namespace and the cgroups, a mount namespace of its own with a private tmpfs, writes the root
tree there and becomes systemd-nspawn; then, once the agent is up, no nested user namespaces.
Like namespace.launch, one of the few places qnix starts a long-running process itself."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qnix.errors import QnixError
from qnix.runtime import cgroups
from qnix.runtime.backends import namespace as ns
from qnix.runtime.backends.container_cgroups import placement
from qnix.runtime.backends.container_tree import Layout, Step, write_tree
from qnix.runtime.netlink import CLONE_NEWNET

log = logging.getLogger("qnix.run")

# nspawn keeps its locks and per-machine folders here; the launcher gives it a private tmpfs.
NSPAWN_RUN_DIR = "/run/systemd/nspawn"
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
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV = 0x2, 0x4
MS_REC, MS_SLAVE = 0x4000, 1 << 19
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True, slots=True)
class PreparedContainer:
    """A systemd-nspawn command line and the tree its launcher writes first."""

    argv: list[str]
    steps: tuple[Step, ...]
    layout: Layout


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
) -> Iterator[tuple[int | None, tuple[int, ...]]]:
    """The namespace and cgroup files opened as for a namespace compartment, closed after."""
    opened = ns.open_targets(netns_path, cgroup)
    try:
        yield opened.netns, opened.procs
    finally:
        for fd in (opened.netns, *opened.procs):
            if fd is not None:
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
