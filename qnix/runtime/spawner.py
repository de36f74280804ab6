"""The spawner: one resident process per run root that forks disposables' keepers.

A disposable built by `qnix dispose` from the command line pays for the whole command line
interface, the spec's models and a keeper that is a fresh interpreter of its own. The spawner
has all of that loaded once: `apply` starts it (as KEEPER_MAIN with `--spawner`, so that the
keepers it forks serve calls like any other), and `qnix dispose`'s fast path (standard library
only, qnix.runtime.quickrun) asks it over a root-only socket for a disposable of a template.
For each request it forks once (the kernel reaps the child: the spawner ignores SIGCHLD) and
the keeper:

1. takes the run root's lock, plans the disposable and sets up its namespace, link and nft
   elements, its run folder and keeper.json (as `qnix dispose` would);
2. runs it (qnix.runtime.keeper.keep), answering on the request's connection, which is also
   its owner: `disposable NAME`, then `ready` (the lock is let go just before) or `error: ...`;
3. ends it, and removes all of it, when that connection closes — also when the `qnix dispose`
   holding it is killed.

A request `refill` tops up the preloaded disposables in a fork, instead of a new interpreter.
The spawner reads the live generation again when its files change. It keeps the environment
of the `qnix apply` that started it (QNIX_AGE_IDENTITY, for a template's secrets). `down`
stops it; `gc` removes the socket and record a killed one left.

Requests are one JSON line from root (the socket is root's, 0600): `{"op": "dispose",
"template": NAME or null}` or `{"op": "refill"}`; anything else closes the connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from qnix.compile.artifacts import SPEC_COPY
from qnix.errors import QnixError
from qnix.runtime import agent, net, seccomp
from qnix.runtime.disposables import (
    link_disposable,
    plan_disposable,
    refill_pools,
    set_up_disposable,
)
from qnix.runtime.files import atomic_write
from qnix.runtime.keeper import ServeCalls, keep, teardown_network
from qnix.runtime.lifecycle import cleanup_run, end_process, read_line
from qnix.runtime.live import KEEPER_MAIN, READY_TIMEOUT, ensure_root, live_workstation
from qnix.runtime.paths import RuntimePaths, check_name
from qnix.runtime.quickrun import compositor_socket, process_start_time
from qnix.spec.model import Workstation

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 4096
STOP_TIMEOUT = 10.0


# ---- the resident process ------------------------------------------------------------------


class _Live:
    """The live generation, read again when its spec file changes."""

    def __init__(self, paths: RuntimePaths) -> None:
        self.paths = paths
        self.seen: tuple[int, int, int] | None = None
        self.workstation: Workstation | None = None

    def current(self) -> Workstation | None:
        try:
            info = os.stat(self.paths.generation_dir / SPEC_COPY)
        except FileNotFoundError:
            self.seen, self.workstation = None, None
            return None
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        if key != self.seen:
            self.workstation = live_workstation(self.paths)
            self.seen = key
        return self.workstation


def _request(conn: socket.socket) -> dict[str, Any] | None:
    """One request line from a client of root's, checked; None if it is not one."""
    conn.settimeout(REQUEST_TIMEOUT)
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    try:
        request = json.loads(data)
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("op") not in ("dispose", "refill"):
        return None
    template = request.get("template")
    if request["op"] == "dispose" and template is not None:
        try:
            check_name(template)
        except (ValueError, TypeError):
            return None
    # Only root can ask (the socket is root's); still only a socket is taken for a compositor.
    compositor = request.get("compositor")
    if compositor is not None and (
        not isinstance(compositor, str)
        or compositor_socket({"WAYLAND_DISPLAY": compositor}) is None
    ):
        return None
    return request


def serve(paths: RuntimePaths, serve_calls: ServeCalls | None) -> int:
    """The spawner's loop (run as KEEPER_MAIN --spawner): says "ready" on stdout once it
    listens, then forks a keeper for each request until SIGTERM."""
    listener = agent.bound_socket(str(paths.spawner_socket))
    listener.listen(64)
    live = _Live(paths)
    record = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
    atomic_write(paths.spawner_record, (json.dumps(record) + "\n").encode(), 0o600)

    def stop(number: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # each keeper forked is reaped by the kernel
    net.preload()  # once here, not in each disposable's fork
    seccomp.compartment_filter_bpf()  # built (and cached) once here: each fork finds it made
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    if agent.uid_of_peer(conn) != 0:
                        continue
                    request = _request(conn)
                    if request is None:
                        continue
                    # Read here, so that each fork finds it read.
                    work = partial(_handle, conn, request, paths, live.current(), serve_calls)
                    _fork_detached(work, listener)
                except Exception as exc:  # one request that fails never ends the spawner
                    print(f"spawner: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.spawner_socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.spawner_record)
    return 0


def _fork_detached(work: Callable[[], int], listener: socket.socket) -> None:
    """`work` in a child of its own session; the kernel reaps it (the spawner ignores
    SIGCHLD), so the spawner never waits for it.

    What the spawner holds is frozen out of the collector first: a collection in the child
    would otherwise touch every object, copying nearly all of the spawner's pages."""
    gc.freeze()
    if os.fork() == 0:
        code = 1
        try:
            listener.close()
            os.setsid()
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(number, signal.SIG_DFL)
            code = work()
        finally:
            os._exit(code)


def _handle(
    conn: socket.socket,
    request: dict[str, Any],
    paths: RuntimePaths,
    workstation: Workstation | None,
    serve_calls: ServeCalls | None,
) -> int:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    if request["op"] == "refill":
        with contextlib.suppress(QnixError):
            refill_pools(paths)
        return 0
    return _dispose(
        conn, request.get("template"), paths, workstation, serve_calls, request.get("compositor")
    )


def _dispose(
    conn: socket.socket,
    template: str | None,
    paths: RuntimePaths,
    workstation: Workstation | None,
    serve_calls: ServeCalls | None,
    compositor: str | None = None,
) -> int:
    """A disposable of `template` owned by `conn` (see the module's description); a GUI
    template's is shown on `compositor` (the asking session's)."""
    conn.settimeout(None)
    try:  # never made here: a `down` since the request may have removed the run root
        lock = os.open(paths.lock_file, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        _say(conn, f"error: no live generation under {paths.run_root}\n")
        return 1
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        # Looked at again under the lock: a `down` that came between took the host away.
        if workstation is None or not (paths.generation_dir / SPEC_COPY).exists():
            raise QnixError(f"no live generation under {paths.run_root}")
        config, uplink = plan_disposable(paths, workstation, template, compositor=compositor)
    except BaseException as exc:
        os.close(lock)
        _refuse(conn, exc)
        return 1
    try:
        ensure_root(paths.run_root)
        set_up_disposable(paths, config, uplink, link=False)
        atomic_write(paths.keeper_config(config.name), config.to_json(), 0o600)
        log = os.open(paths.keeper_log(config.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 2)
        os.close(log)
    except BaseException as exc:
        teardown_network(config)
        cleanup_run(paths, config.name)
        os.close(lock)
        _refuse(conn, exc)
        return 1
    _say(conn, f"disposable {config.name}\n")
    notify = os.dup(conn.fileno())
    # The lock is held until the agent answers, so that no `gc` takes a starting disposable
    # for a crashed one; the connection is the owner: closed, the disposable ends.
    return keep(
        config,
        notify,
        serve_calls,
        owner=conn.fileno(),
        # The link's kernel work overlaps the sandbox's and its agent's start.
        while_starting=lambda: link_disposable(paths, config, uplink),
        on_ready=lambda: os.close(lock),
    )


def _refuse(conn: socket.socket, exc: BaseException) -> None:
    _say(conn, f"error: {exc.message if isinstance(exc, QnixError) else exc}\n")


def _say(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(line.encode())


# ---- starting and stopping it ----------------------------------------------------------------


def _record(paths: RuntimePaths) -> dict[str, int] | None:
    try:
        record = json.loads(paths.spawner_record.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), int) for key in ("pid", "start")
    ):
        return None
    return {"pid": record["pid"], "start": record["start"]}


def running(paths: RuntimePaths) -> bool:
    record = _record(paths)
    return record is not None and process_start_time(record["pid"]) == record["start"]


def ensure_running(paths: RuntimePaths) -> bool:
    """Start the spawner unless it runs; True if it was started. The caller holds the lock
    (and the spawner's disposables wait for it)."""
    if running(paths):
        return False
    remove_leftovers(paths)
    ensure_root(paths.run_root)
    log = os.open(paths.run_root / "spawner.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    argv = [sys.executable, "-I", "-m", KEEPER_MAIN, "--spawner", *_path_args(paths)]
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)
    assert process.stdout is not None
    try:
        line = read_line(process.stdout.fileno(), READY_TIMEOUT)
    finally:
        process.stdout.close()
    if line != "ready":
        process.kill()
        process.wait()
        remove_leftovers(paths)
        raise QnixError(
            f"the spawner did not start (said {line[:80]!r})",
            hint=f"its log: {paths.run_root / 'spawner.log'}",
        )
    return True


def _path_args(paths: RuntimePaths) -> list[str]:
    return [str(paths.state_root), str(paths.run_root), paths.netns_prefix, paths.host_netns or ""]


def paths_of(args: list[str]) -> RuntimePaths:
    state_root, run_root, prefix, host_netns = args
    return RuntimePaths(Path(state_root), Path(run_root), prefix, host_netns or None).checked()


def stop(paths: RuntimePaths) -> bool:
    """Stop the spawner if it runs (the disposables it started go on: each is its own
    keeper's); True if it ran."""
    record = _record(paths)
    was_running = running(paths)
    if record is not None and was_running:
        try:
            pidfd = os.pidfd_open(record["pid"])
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            try:
                end_process(pidfd, STOP_TIMEOUT)
            finally:
                os.close(pidfd)
    remove_leftovers(paths)
    return was_running


def remove_leftovers(paths: RuntimePaths) -> bool:
    """The socket and record of a spawner that is not running; True if there were any."""
    if running(paths):
        return False
    found = False
    for path in (paths.spawner_socket, paths.spawner_record):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            found = True
    return found
