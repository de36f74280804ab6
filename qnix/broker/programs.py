"""Running programs in compartments for the broker, through their agents.

The keeper binds every `qnix/inside/*.py` read-only at /opt/qnix-agent/ in each compartment;
the broker runs them with the compartment's own interpreter, as its only user, with stdio
descriptors the host made (pipes between two compartments, or to the host). Unlike
`agent.execute`, `start` returns as soon as the agent has the descriptors, so the host can
close its copies at once: a pipe between two compartments then ends when the writer inside
ends, and two programs can run at the same time.

Everything a program sends back is untrusted: it is read with a size cap (`Drain`) and shown
through `shown`.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qnix.errors import QnixError
from qnix.runtime import agent, lifecycle
from qnix.runtime.keeper import INSIDE_DIR
from qnix.runtime.live import KeeperConfig
from qnix.runtime.paths import PathError, RuntimePaths, check_name
from qnix.runtime.quickrun import command_env, running_state

ERROR_CAP = 4096


def shown(untrusted: bytes | str, limit: int = 400) -> str:
    """Text from a compartment for a terminal or a log: printable ASCII, the rest escaped."""
    text = untrusted if isinstance(untrusted, str) else untrusted.decode("utf-8", "replace")
    text = text.strip()
    escaped = "".join(
        c if " " <= c <= "~" and c != "\\" else c.encode("unicode_escape").decode() for c in text
    )
    return escaped[:limit] + ("..." if len(escaped) > limit else "")


@dataclass(frozen=True, slots=True)
class Running:
    """A running compartment, as the broker talks to it."""

    paths: RuntimePaths
    name: str
    state: dict[str, Any]
    interpreter: str

    @property
    def home(self) -> str:
        return str(self.state["cwd"])

    @property
    def user(self) -> str:
        return str(self.state["user"])

    def program(self, file: str, *args: str) -> list[str]:
        """The argv that runs qnix/inside/FILE inside."""
        return [self.interpreter, "-I", "-S", f"{INSIDE_DIR}/{file}", *args]


def running(paths: RuntimePaths, name: str) -> Running | None:
    try:
        check_name(name)
    except PathError as exc:
        raise QnixError(str(exc)) from None
    state = running_state(paths, name)
    if state is None:
        return None
    try:
        config = KeeperConfig.from_json(paths.keeper_config(name).read_bytes())
    except (OSError, ValueError, TypeError):
        return None
    return Running(paths, name, state, config.interpreter)


def ensure_running(paths: RuntimePaths, name: str, *, autostart: bool = True) -> Running:
    """`name` running (started first if it is not and `autostart` allows)."""
    found = running(paths, name)
    if found is None and autostart:
        lifecycle.start(paths, name)
        found = running(paths, name)
    if found is None:
        raise QnixError(
            f"compartment {name} is not running", hint=f"start it first: qnix start {name}"
        )
    return found


@dataclass
class Started:
    """A command the agent has started; `wait` for its exit code."""

    sock: _socket.socket
    name: str

    def wait(self) -> int:
        try:
            while True:
                untrusted, fds = agent.recv_message(self.sock)
                for fd in fds:
                    os.close(fd)
                op = untrusted.get("op")
                if op == "started":
                    continue
                if op == "exited":
                    code = untrusted.get("code")
                    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
                        raise QnixError(f"{self.name}: the agent reported a bad exit code")
                    return code
                if op == "error":
                    raise QnixError(
                        f"{self.name}: the agent refused: {shown(str(untrusted.get('message')))}"
                    )
                raise QnixError(f"{self.name}: unexpected message from the agent: {shown(str(op))}")
        except (agent.ProtocolError, OSError) as exc:
            raise QnixError(f"{self.name}: lost the agent: {exc}") from None
        finally:
            self.sock.close()


def start(target: Running, argv: Sequence[str], stdio: Sequence[int]) -> Started:
    """Start argv in `target` with the three descriptors `stdio`; the caller may close its
    copies as soon as this returns."""
    host_uid = target.state["host_uid"]
    try:
        sock = agent.connect(str(target.paths.agent_socket(target.name)), peer_uid=host_uid)
        try:
            message = {
                "op": "exec",
                "argv": list(argv),
                "env": command_env(target.state, False),
                "cwd": target.home,
            }
            agent.send_message(sock, message, list(stdio))
            sock.settimeout(None)  # the command may take as long as it needs
        except BaseException:
            sock.close()
            raise
    except (agent.AgentError, agent.ProtocolError, OSError) as exc:
        raise QnixError(f"cannot run in {target.name}: {exc}") from None
    return Started(sock, target.name)


@dataclass
class Drain:
    """Reads a pipe to its end in a thread, keeping the first `cap` bytes (and whether more
    came), so that a program writing a lot never blocks on us."""

    fd: int
    cap: int = ERROR_CAP
    data: bytearray = field(default_factory=bytearray)
    overflow: bool = False
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                room = self.cap - len(self.data)
                if len(chunk) > room:
                    self.overflow = True
                self.data += chunk[: max(room, 0)]
        except OSError:
            self.overflow = True
        finally:
            os.close(self.fd)

    def result(self) -> bytes:
        assert self.thread is not None
        self.thread.join()
        return bytes(self.data)


@dataclass(frozen=True, slots=True)
class Outcome:
    code: int
    stdout: bytes
    stderr: bytes
    stdout_overflow: bool = False

    def error(self, what: str) -> str:
        detail = shown(self.stderr) or f"exit code {self.code}"
        return f"{what}: {detail}"


def pipe(size: int = 1 << 20) -> tuple[int, int]:
    """A pipe with a large buffer (fewer, larger reads for a big transfer)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, size)
    return read_fd, write_fd


def run_capture(
    target: Running,
    argv: Sequence[str],
    *,
    stdin: bytes | int | None = None,
    stdout_cap: int = 1 << 20,
) -> Outcome:
    """Run argv in `target`; its output (capped) and exit code. `stdin`: bytes to send, a
    descriptor to pass (closed here), or None for /dev/null."""
    out_read, out_write = pipe(1 << 16)
    err_read, err_write = pipe(1 << 16)
    feeder: threading.Thread | None = None
    if isinstance(stdin, bytes):
        in_read, in_write = pipe(1 << 16)
        data = stdin

        def feed() -> None:
            with contextlib.suppress(OSError):
                view = memoryview(data)
                while view:
                    view = view[os.write(in_write, view) :]
            os.close(in_write)

        feeder = threading.Thread(target=feed, daemon=True)
    elif isinstance(stdin, int):
        in_read = stdin
    else:
        in_read = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        started = start(target, argv, (in_read, out_write, err_write))
    except BaseException:
        for fd in (out_read, err_read, *((in_write,) if feeder is not None else ())):
            os.close(fd)
        raise
    finally:
        for fd in (in_read, out_write, err_write):
            os.close(fd)
    if feeder is not None:
        feeder.start()
    out, err = Drain(out_read, stdout_cap), Drain(err_read)
    code = started.wait()
    if feeder is not None:
        feeder.join()
    stdout = out.result()
    return Outcome(code, stdout, err.result(), out.overflow)
