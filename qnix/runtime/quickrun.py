"""`qnix run NAME -- CMD...` on its fast path: straight to the compartment's agent.

Running a command in a compartment that is already up needs three things: the agent's socket
(from the keeper's state.json), the compartment's environment (same file) and one line in the
audit log. This module does exactly that with the standard library only: no click, rich,
or pydantic is imported, so `qnix run` costs little more than the interpreter's own
start. Anything else — a compartment that is not running (it is started first, like
`qvm-run`), `--help`, `--debug`, a malformed command line — returns None and the full command
line interface takes over (qnix.cli.entry).
"""

from __future__ import annotations

import _socket
import json
import os
import sys

from qnix.audit import events
from qnix.fastpath import Record
from qnix.runtime import agent
from qnix.runtime.paths import PathError, RuntimePaths, check_name

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import: only the type checker reads these
    from collections.abc import Callable, Sequence
    from typing import Any

# The state.json fields the fast path relies on, with their types.
STATE_FIELDS: dict[str, type] = {
    "keeper_pid": int,
    "keeper_start": int,
    "host_uid": int,
    "socket": str,
    "user": str,
    "env": dict,
    "cwd": str,
}
# Passed from the caller's environment when its stdin is a terminal.
TERMINAL_ENV = ("TERM", "COLORTERM")
# How long a preloaded disposable's keeper may take to answer a claim.
CLAIM_TIMEOUT = 2.0
# How long the spawner may take to start a disposable (a VM's boots under TCG).
SPAWN_TIMEOUT = 120.0


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), which
    with the pid names one process even after the pid is reused; None if there is none, or
    only its zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def read_state(paths: RuntimePaths, name: str) -> dict[str, Any] | None:
    """The keeper's state.json for `name`, or None if there is none or it is malformed."""
    try:
        with open(paths.state_file(name), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    for field, kind in STATE_FIELDS.items():
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            return None
    return state


def keeper_alive(state: dict[str, Any]) -> bool:
    pid = int(state["keeper_pid"])
    return pid > 0 and process_start_time(pid) == state["keeper_start"]


def running_state(paths: RuntimePaths, name: str) -> dict[str, Any] | None:
    """The state of `name` if its keeper is alive (the compartment is running), else None."""
    state = read_state(paths, name)
    if state is None or not keeper_alive(state):
        return None
    return state


def command_env(state: dict[str, Any], stdin_is_tty: bool) -> dict[str, str]:
    env = {str(k): str(v) for k, v in state["env"].items()}
    if stdin_is_tty:
        for key in TERMINAL_ENV:
            if key in os.environ:
                env[key] = os.environ[key]
    return env


def execute(
    paths: RuntimePaths,
    name: str,
    state: dict[str, Any],
    argv: Sequence[str],
    stdio: Sequence[int] = (0, 1, 2),
    *,
    event: str = "run",
    on_started: Callable[[int], None] | None = None,
    **audit: events.FieldValue,
) -> int:
    """Run argv in the running compartment with our stdio; its exit code. Audited as `event`
    (`run`, or `dispose` with the template) once the command has ended. `on_started`: see
    agent.execute."""
    terminal = os.isatty(stdio[0]) and os.isatty(stdio[1])
    env = command_env(state, os.isatty(stdio[0]))
    fields: dict[str, events.FieldValue] = {"compartment": name, **audit, "argv": list(argv)}
    try:
        # In the run folder, which only root may change; and only an agent running as the
        # compartment's uid is spoken to.
        code = agent.execute(
            str(paths.agent_socket(name)),
            argv,
            env=env,
            cwd=state["cwd"],
            stdio=stdio,
            peer_uid=state["host_uid"],
            terminal=terminal,
            on_started=on_started,
        )
    except (agent.AgentError, agent.ProtocolError) as exc:
        events.record(paths, event, **fields, result=f"error: {exc}")
        raise
    events.record(paths, event, **fields, result=code)
    return code


class RunRequest(Record):
    """A parsed `qnix run` command line."""

    __slots__ = ("command", "name", "run_root", "state_root", "user")
    _FIELDS = ("name", "command", "user", "state_root", "run_root")
    name: str
    command: tuple[str, ...]
    user: str | None
    state_root: str | None
    run_root: str | None

    def __init__(
        self,
        name: str,
        command: tuple[str, ...],
        user: str | None = None,
        state_root: str | None = None,
        run_root: str | None = None,
    ) -> None:
        super().__init__(name, command, user, state_root, run_root)


_VALUE_OPTIONS = {
    "--user": "user",
    "-u": "user",
    "--state-root": "state_root",
    "--run-root": "run_root",
}


def parse_run(argv: Sequence[str]) -> RunRequest | None:
    """`run [OPTIONS] NAME [OPTIONS] -- CMD...`; None for anything else."""
    if len(argv) < 4 or argv[0] != "run" or "--" not in argv:
        return None
    split = list(argv).index("--")
    command = tuple(argv[split + 1 :])
    parsed = _options(argv[1:split], _VALUE_OPTIONS)
    if not command or parsed is None or len(parsed[1]) != 1:
        return None
    return RunRequest(parsed[1][0], command, **parsed[0])


class DisposeRequest(Record):
    """A parsed `qnix dispose` command line."""

    __slots__ = ("command", "run_root", "state_root", "template")
    _FIELDS = ("command", "template", "state_root", "run_root")
    command: tuple[str, ...]
    template: str | None
    state_root: str | None
    run_root: str | None

    def __init__(
        self,
        command: tuple[str, ...],
        template: str | None = None,
        state_root: str | None = None,
        run_root: str | None = None,
    ) -> None:
        super().__init__(command, template, state_root, run_root)


_DISPOSE_OPTIONS = {
    "--template": "template",
    "-t": "template",
    "--state-root": "state_root",
    "--run-root": "run_root",
}


def _options(head: Sequence[str], known: dict[str, str]) -> tuple[dict[str, str], list[str]] | None:
    """`--option VALUE`, `--option=VALUE` (each once) and positionals; None for anything else."""
    values: dict[str, str] = {}
    positional: list[str] = []
    index = 0
    while index < len(head):
        token = head[index]
        option, equals, value = token.partition("=")
        if option in known and known[option] not in values:
            if not equals:
                index += 1
                if index >= len(head):
                    return None
                value = head[index]
            values[known[option]] = value
        elif token.startswith("-"):
            return None
        else:
            positional.append(token)
        index += 1
    return values, positional


def parse_dispose(argv: Sequence[str]) -> DisposeRequest | None:
    """`dispose [OPTIONS] -- CMD...`; None for anything else."""
    if len(argv) < 3 or argv[0] != "dispose" or "--" not in argv:
        return None
    split = list(argv).index("--")
    command = tuple(argv[split + 1 :])
    parsed = _options(argv[1:split], _DISPOSE_OPTIONS)
    if not command or parsed is None or parsed[1]:
        return None
    return DisposeRequest(command, **parsed[0])


def claim_preloaded(paths: RuntimePaths, template: str) -> tuple[str, _socket.socket] | None:
    """Take one preloaded disposable of `template`: its name and the connection that owns it
    (the disposable ends when the connection closes — also when this process is killed)."""
    folder = paths.pool_dir(template)
    try:
        candidates = sorted(entry for entry in os.listdir(folder) if entry.endswith(".sock"))
    except OSError:
        return None
    for entry in candidates:
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        connection.settimeout(CLAIM_TIMEOUT)
        try:
            connection.connect(str(folder / entry))
            answer = connection.recv(16)
        except OSError:
            answer = b""
        if answer == b"yours\n":
            connection.settimeout(None)
            return entry.removesuffix(".sock"), connection
        connection.close()  # taken by another `qnix dispose`, or its keeper is gone
    return None


def _ask_spawner(paths: RuntimePaths, request: dict[str, Any]) -> _socket.socket | None:
    """A connection to the spawner (qnix.runtime.spawner) with `request` sent; None if no
    spawner answers here."""
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    connection.settimeout(SPAWN_TIMEOUT)
    try:
        connection.connect(str(paths.spawner_socket))
        connection.sendall(json.dumps(request).encode() + b"\n")
    except OSError:
        connection.close()
        return None
    return connection


def compositor_socket(environ: dict[str, str]) -> str | None:
    """The Wayland compositor's socket, from the environment of the command that starts a
    compartment: QNIX_WAYLAND_DISPLAY, else WAYLAND_DISPLAY (a path, or a name in
    XDG_RUNTIME_DIR); None when that is not a socket. (Here, not beside the filter, because
    `qnix dispose` passes it to the spawner on the fast path.)"""
    display = environ.get("QNIX_WAYLAND_DISPLAY") or environ.get("WAYLAND_DISPLAY")
    if not display:
        return None
    if not display.startswith("/"):
        runtime_dir = environ.get("XDG_RUNTIME_DIR")
        if not runtime_dir:
            return None
        display = f"{runtime_dir}/{display}"
    try:
        mode = os.stat(display).st_mode
    except OSError:
        return None
    return display if mode & 0o170000 == 0o140000 else None  # S_IFSOCK, without `stat`


def spawned_disposable(
    paths: RuntimePaths, template: str | None
) -> tuple[str, _socket.socket] | None:
    """A fresh disposable of `template` (None: the default) from the spawner: its name and the
    connection that owns it (closed, also by the kernel when this process dies, the
    disposable ends). None if no spawner runs or it could not make one (the full command line
    then builds one itself, and says why if it cannot)."""
    # The compositor of the session asking, for a GUI template (the spawner has none of its own).
    compositor = compositor_socket(dict(os.environ))
    connection = _ask_spawner(
        paths, {"op": "dispose", "template": template, "compositor": compositor}
    )
    if connection is None:
        return None
    answer = b""
    try:
        while not answer.endswith(b"ready\n") and b"error:" not in answer:
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    lines = answer.decode(errors="replace").splitlines()
    if len(lines) == 2 and lines[0].startswith("disposable ") and lines[1] == "ready":
        connection.settimeout(None)
        return lines[0].removeprefix("disposable "), connection
    connection.close()
    return None


def refill_in_background(paths: RuntimePaths) -> None:
    """Start a new preloaded disposable behind the one just used, detached from us: by the
    spawner, or else by a new interpreter (spawned, not forked: copying this process would
    cost the command's caller a millisecond)."""
    asked = _ask_spawner(paths, {"op": "refill"})
    if asked is not None:
        asked.close()
        return
    argv = [sys.executable, "-I", "-m", "qnix.runtime.refill"]
    try:
        os.posix_spawn(
            sys.executable,
            [*argv, str(paths.state_root), str(paths.run_root)],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)],
            setsid=True,
        )
    except OSError as exc:  # the next `qnix dispose` builds a fresh disposable instead
        sys.stderr.write(f"warning: could not start preloading another disposable: {exc}\n")


def dispose_fast(argv: Sequence[str]) -> int | None:
    """`qnix dispose` with a preloaded disposable, or else a fresh one from the spawner; None
    when the full command line must handle it (no live generation, no spawner running)."""
    request = parse_dispose(argv)
    if request is None or os.geteuid() != 0:
        return None
    try:
        paths = RuntimePaths.from_options(request.state_root, request.run_root)
        with open(paths.pool_file, encoding="utf-8") as handle:
            pool = json.load(handle)
        template = request.template or pool["default"]
        check_name(template)
    except (OSError, ValueError, KeyError, TypeError, PathError):
        return None
    # No signal handlers: killed by any signal, this process's claim connection is closed by
    # the kernel, and the keeper ends the disposable and removes all of it.
    claimed = claim_preloaded(paths, template)
    preloaded = claimed is not None
    if claimed is None:
        claimed = spawned_disposable(paths, template)
    if claimed is None:
        return None
    name, connection = claimed
    try:
        state = running_state(paths, name)
        if state is None:
            sys.stderr.write(f"error: disposable {name} ended before its command\n")
            return 1
        try:
            return execute(paths, name, state, request.command, event="dispose", template=template)
        except (agent.AgentError, agent.ProtocolError) as exc:
            sys.stderr.write(f"error: cannot run in disposable {name}: {exc}\n")
            return 1
    finally:
        if preloaded:
            refill_in_background(paths)
        connection.close()  # the keeper ends the disposable and removes all of it


def run_fast(argv: Sequence[str]) -> int | None:
    """The exit code of the command, or None when the full command line must handle it."""
    request = parse_run(argv)
    if request is None:
        return None
    try:
        check_name(request.name)
        paths = RuntimePaths.from_options(request.state_root, request.run_root)
    except PathError:
        return None
    state = running_state(paths, request.name)
    if state is None or (request.user is not None and request.user != state["user"]):
        return None
    try:
        return execute(paths, request.name, state, request.command)
    except (agent.AgentError, agent.ProtocolError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
