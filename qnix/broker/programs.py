"""Running programs in compartments for the broker, through their agents.

The keeper binds every `qnix/inside/*.py` read-only at /opt/qnix-agent/ in each compartment;
the broker runs them with the compartment's own interpreter, as its only user, with stdio
descriptors the host made (pipes between two compartments, or to the host). Unlike
`agent.execute`, `start` returns as soon as the agent has the descriptors, so the host can
close its copies at once: a pipe between two compartments then ends when the writer inside
ends, and two programs can run at the same time.

Everything a program sends back is untrusted: it is read with a size cap (`Drain`) and shown
through `shown`. Nothing in a compartment can hold the host up: the agents' reports and the
programs' pipes are served together as they become ready (`wait_all`), never waited on to
their end (any process of the compartment's user can keep a pipe open), and every wait has a
deadline (QNIX_TRANSFER_TIMEOUT); when it passes, the host closes its agent connections and
reports which compartment did not finish.
"""

from __future__ import annotations

import _socket
import contextlib
import math
import os
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qnix.errors import QnixError
from qnix.runtime import agent, lifecycle
from qnix.runtime.keeper import INSIDE_DIR
from qnix.runtime.live import KeeperConfig
from qnix.runtime.paths import PathError, RuntimePaths, check_name
from qnix.runtime.quickrun import command_env, running_state

ERROR_CAP = 4096
ENV_TRANSFER_TIMEOUT = "QNIX_TRANSFER_TIMEOUT"
# A transfer must end within this: the default 8 GiB limit at 14 MB/s; and well beyond qfile's
# own 120 s without data, so that a source that stops sending is named by the target's unpack.
TRANSFER_TIMEOUT = 600.0
# Once one end of a stream has ended, the other must report its own end within this (left for
# it: a last pipeful, the staging folder of a refused transfer to remove, an fsync).
FINISH_TIMEOUT = 60.0


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
    """A command the agent has started, until the agent reports its end (`wait_all`)."""

    sock: _socket.socket
    name: str

    def reply(self) -> int | None:
        """The next message of the agent: the exit code it reports, or None for `started`."""
        try:
            untrusted, fds = agent.recv_message(self.sock)
        except BlockingIOError:
            # An agent writes each message whole; one trickled in must not stretch a deadline.
            raise QnixError(f"{self.name}: the agent sent half a message") from None
        except (agent.ProtocolError, OSError) as exc:
            raise QnixError(f"{self.name}: lost the agent: {exc}") from None
        for fd in fds:
            os.close(fd)
        op = untrusted.get("op")
        if op == "started":
            return None
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

    def wait(self) -> int:
        """The exit code, however long it takes: only for a program the admin works in on
        this terminal (open-in-dvm's opener), which their ^C ends."""
        try:
            while (code := self.reply()) is None:
                pass
            return code
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
    """A program's output pipe, read whenever it has something, keeping the first `cap` bytes
    (and whether more came), so that a program writing a lot never blocks on us. Never read
    to its end: anything else in the compartment may hold the pipe open."""

    fd: int
    cap: int = ERROR_CAP
    data: bytearray = field(default_factory=bytearray)
    overflow: bool = False
    events: ClassVar[int] = select.POLLIN

    def __post_init__(self) -> None:
        os.set_blocking(self.fd, False)

    def _read(self) -> bytes | None:
        """One read: what came (b"" at the end), None when nothing is there now."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            self.overflow = True
            return b""
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.overflow = True
        self.data += chunk[: max(room, 0)]
        return chunk

    def serve(self) -> bool:
        """Take what is there; False once the pipe has ended."""
        return self._read() != b""

    def result(self) -> bytes:
        """What came, with what the pipe holds now (all the program wrote, once its end is
        reported); then the pipe is closed."""
        if self.fd >= 0:
            while not self.overflow and self._read():
                pass
            self.close()
        return bytes(self.data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Feed:
    """Bytes for a program's stdin, written whenever the pipe has room; closed when all are
    written (the program sees the end) or the reader is gone."""

    fd: int
    data: memoryview
    events: ClassVar[int] = select.POLLOUT

    def __post_init__(self) -> None:
        os.set_blocking(self.fd, False)

    def serve(self) -> bool:
        """Write what fits; False once done."""
        try:
            self.data = self.data[os.write(self.fd, self.data) :]
        except BlockingIOError:
            return True
        except OSError:
            self.data = self.data[:0]
        if self.data:
            return True
        self.close()
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def wait_all(
    commands: Sequence[Started], pipes: Sequence[Drain | Feed], until: float
) -> list[int | None]:
    """The exit codes the agents report for `commands`, in order, while `pipes` are served
    whenever they are ready. None for a command whose end was not reported in time: by
    `until` (a time.monotonic()), and within FINISH_TIMEOUT once another of them ended. The
    agent connections are closed when this returns (the agents then end what still runs)."""
    codes: dict[int, int] = {}
    waiting = {command.sock.fileno(): index for index, command in enumerate(commands)}
    serving = {pipe.fd: pipe for pipe in pipes if pipe.fd >= 0}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    for fd, served in serving.items():
        poller.register(fd, served.events)
    deadline = until
    try:
        for command in commands:
            command.sock.setblocking(False)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(math.ceil(left * 1000)):
                if fd in serving:
                    if not serving[fd].serve():
                        poller.unregister(fd)
                        del serving[fd]
                    continue
                index = waiting[fd]
                code = commands[index].reply()
                if code is not None:
                    codes[index] = code
                    poller.unregister(fd)
                    del waiting[fd]
                    deadline = min(deadline, time.monotonic() + FINISH_TIMEOUT)
    finally:
        for command in commands:
            command.sock.close()
    return [codes.get(index) for index in range(len(commands))]


def transfer_timeout() -> float:
    """Seconds a broker transfer may take: QNIX_TRANSFER_TIMEOUT, else TRANSFER_TIMEOUT."""
    raw = os.environ.get(ENV_TRANSFER_TIMEOUT, "")
    if not raw:
        return TRANSFER_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise QnixError(
            f"{ENV_TRANSFER_TIMEOUT}={shown(raw, 40)} is not a number of seconds",
            hint=f"unset it for the default, {TRANSFER_TIMEOUT:g} s",
        )
    return seconds


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a broker transfer begun now must have ended."""

    seconds: float
    at: float  # time.monotonic()

    @classmethod
    def start(cls) -> Deadline:
        seconds = transfer_timeout()
        return cls(seconds, time.monotonic() + seconds)

    def hint(self, name: str, stuck: str = "is stuck") -> str:
        """What to do when `name` did not finish in time."""
        return (
            f"if {name} {stuck}, `qnix restart {name}` ends what holds it up; a transfer that "
            f"is just big may take more than {self.seconds:g} s: {ENV_TRANSFER_TIMEOUT}=SECONDS"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    code: int | None  # None: its end was not reported in time
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
    doing: str,
    stdin: bytes | None = None,
    stdout_cap: int = 1 << 20,
) -> Outcome:
    """Run argv in `target`; its output (capped) and exit code. `stdin`: bytes to send, or
    None for /dev/null. QnixError if it does not end in time (`doing` says what it does)."""
    deadline = Deadline.start()
    out_read, out_write = pipe(1 << 16)
    err_read, err_write = pipe(1 << 16)
    if stdin is None:
        in_read, in_write = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1
    else:
        in_read, in_write = pipe(1 << 16)
    try:
        started = start(target, argv, (in_read, out_write, err_write))
    except BaseException:
        for fd in (out_read, err_read, in_write):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        for fd in (in_read, out_write, err_write):
            os.close(fd)
    out, err = Drain(out_read, stdout_cap), Drain(err_read)
    pipes: list[Drain | Feed] = [out, err]
    if stdin is not None:
        pipes.append(Feed(in_write, memoryview(stdin)))
    try:
        (code,) = wait_all([started], pipes, deadline.at)
        if code is None:
            raise QnixError(
                f"{target.name} did not finish {doing} within {deadline.seconds:g} s",
                hint=deadline.hint(target.name),
            )
        return Outcome(code, out.result(), err.result(), out.overflow)
    finally:
        for served in pipes:
            served.close()
