"""The qnix agent (inside a compartment) and its host-side client.

Like Qubes' qrexec-agent: the compartment's first process listens on a unix socket that the host
binds into it; the host asks it to run commands and deliver files. This module imports only the
standard library so that it runs inside a compartment as a lone file (`python3 -I agent.py
serve SOCKET`), and so that `qnix run` pays for nothing else on its hot path.

Wire format, both directions: a 4-byte big-endian length, then that many bytes of a JSON object.
A request may carry file descriptors (SCM_RIGHTS): `exec` carries the caller's stdin, stdout and
stderr, so input, output and a terminal pass straight through without copying.

Everything the agent reads comes from the host but crosses a trust boundary all the same, and
everything the host reads back comes from a compartment: both sides validate each message
(size, type of every field) and treat a malformed one as the end of the conversation.
"""

from __future__ import annotations

# The C module: the `socket` wrapper (with its enums and selectors), `signal`, `struct`,
# `array`, `contextlib` and `typing` together cost `qnix run` more than the rest of its work.
import _socket
import errno
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 3
MAX_ARGS = 4096
MAX_TERMINAL_SIDE = 10000
REQUEST_TIMEOUT = 10.0
HEADER_SIZE = 4  # a big-endian unsigned length
UCRED_SIZE = 12  # struct ucred: pid, uid, gid (32 bits each)


class ProtocolError(Exception):
    """A malformed, oversized or unexpected message: the conversation ends."""


# ---- framing -------------------------------------------------------------------------------


def _fd_bytes(fds: Sequence[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def _fds_of(payload: bytes) -> list[int]:
    whole = len(payload) - len(payload) % 4
    return [
        int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True) for i in range(0, whole, 4)
    ]


def send_message(sock: _socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    import json  # where used: inside, the agent says "ready" before loading it (see serve)

    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    data = len(body).to_bytes(HEADER_SIZE, "big") + body
    if fds:
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _fd_bytes(fds))]
        sent = sock.sendmsg([data], ancillary)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: _socket.socket, size: int, fds: list[int]) -> bytes:
    """`size` bytes; the descriptors that came with them are appended to `fds` (the caller
    closes them if this raises)."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        data, ancdata, flags, _ = sock.recvmsg(remaining, _socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds.extend(_fds_of(payload))
        if flags & _socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors")
        if not data:
            raise ProtocolError("connection closed mid-message" if chunks else "connection closed")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def recv_message(sock: _socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it; ProtocolError if malformed. On any
    failure (also a timeout or a reset mid-message) the descriptors received are closed."""
    import json  # where used: inside, the agent says "ready" before loading it (see serve)

    fds: list[int] = []
    try:
        size = int.from_bytes(_recv_exact(sock, HEADER_SIZE, fds), "big")
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
        body = _recv_exact(sock, size, fds)
        if len(fds) > MAX_FDS:
            raise ProtocolError("too many file descriptors")
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ProtocolError("a message is an object with a string 'op'")
    except BaseException:
        _close_all(fds)
        raise
    return message, fds


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 - contextlib stays off the fast path
            os.close(fd)
        except OSError:
            pass


# ---- validation of requests (agent side) -----------------------------------------------------


def _string_list(value: Any, what: str, *, min_items: int = 0) -> list[str]:
    if not isinstance(value, list) or not min_items <= len(value) <= MAX_ARGS:
        raise ProtocolError(f"{what} must be a list of {min_items} to {MAX_ARGS} strings")
    for item in value:
        if not isinstance(item, str) or "\x00" in item:
            raise ProtocolError(f"{what} must hold strings without NUL")
    return value


def _terminal_size(untrusted: Any) -> tuple[int, int] | None:
    """`tty`: None (the caller's stdio is passed) or {"rows": R, "cols": C}."""
    if untrusted is None:
        return None
    if not isinstance(untrusted, dict) or set(untrusted) != {"rows", "cols"}:
        raise ProtocolError("tty must be an object with rows and cols")
    size = untrusted["rows"], untrusted["cols"]
    if not all(type(n) is int and 0 <= n <= MAX_TERMINAL_SIDE for n in size):
        raise ProtocolError(f"terminal rows and cols must be 0 to {MAX_TERMINAL_SIDE}")
    return size


def validate_exec(untrusted: Mapping[str, Any], untrusted_fds: Sequence[int]) -> dict[str, Any]:
    """An exec request checked field by field; unknown fields are refused."""
    allowed = {"op", "argv", "env", "cwd", "tty"}
    if set(untrusted) - allowed:
        raise ProtocolError(f"unknown fields: {sorted(set(untrusted) - allowed)}")
    argv = _string_list(untrusted.get("argv"), "argv", min_items=1)
    env_pairs = untrusted.get("env", {})
    if not isinstance(env_pairs, dict) or len(env_pairs) > 256:
        raise ProtocolError("env must be an object of at most 256 entries")
    env = {}
    for key, value in env_pairs.items():
        if not isinstance(value, str) or not key or "=" in key or "\x00" in key + value:
            raise ProtocolError("env entries must be NAME=VALUE strings without NUL")
        env[key] = value
    cwd = untrusted.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd):
        raise ProtocolError("cwd must be an absolute path")
    tty = _terminal_size(untrusted.get("tty"))
    if tty is not None and untrusted_fds:
        raise ProtocolError("an exec on a terminal of the compartment takes no descriptors")
    if tty is None and len(untrusted_fds) != 3:
        raise ProtocolError("exec needs exactly three descriptors: stdin, stdout, stderr")
    return {"argv": argv, "env": env, "cwd": cwd, "tty": tty}


# ---- the agent -------------------------------------------------------------------------------


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _open_terminal(rows: int, cols: int) -> tuple[int, int]:
    """A pseudo-terminal of the compartment's own (its /dev/pts), of the caller's size."""
    import fcntl
    import termios

    master, slave = os.openpty()
    size = rows.to_bytes(2, sys.byteorder) + cols.to_bytes(2, sys.byteorder) + bytes(4)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    return master, slave


def _spawn_plain(request: Mapping[str, Any], fds: Sequence[int]) -> int:
    """posix_spawn (a vfork) the command with `fds` as its stdio, in a session of its own:
    cheaper than forking the agent. The agent is one thread, so it may step into the
    command's folder for the spawn. Every descriptor of the agent but these is close-on-exec
    (serve closes what it inherited; Python opens the rest so)."""
    import signal

    argv = request["argv"]
    actions: list[tuple[int, ...]] = [
        (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)
    ]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in set(fds)]
    os.chdir(request["cwd"] or "/")
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            request["env"],
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE,),
        )
    finally:
        os.chdir("/")


def _spawn(request: Mapping[str, Any], fds: Sequence[int]) -> int:
    """Fork the command; on a terminal (fds = (slave,)*3) it becomes the terminal's
    controlling process, so job control and ^C work inside."""
    pid = os.fork()
    if pid == 0:  # the child: becomes the command
        try:
            os.setsid()
            if request["tty"] is not None:
                import fcntl
                import termios

                fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.closerange(3, 65536)
            if request["cwd"]:
                os.chdir(request["cwd"])
            import signal

            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.execvpe(request["argv"][0], request["argv"], request["env"])
        except FileNotFoundError:
            os.write(2, f"qnix-agent: command not found: {request['argv'][0]}\n".encode())
            os._exit(127)
        except OSError as exc:
            os.write(2, f"qnix-agent: cannot run {request['argv'][0]}: {exc.strerror}\n".encode())
            os._exit(126)
    return pid


def _start_request(conn: socket.socket) -> int | None:
    """Read one request and act on it: the pid of the command it started (whose end the
    caller reports on `conn`), or None when it has been answered already."""
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT)  # a silent client must not hold up the others long
        untrusted, fds = recv_message(conn)
        op = untrusted["op"]
        if op == "ping":
            send_message(conn, {"op": "pong", "pid": os.getpid()})
            return None
        if op != "exec":
            raise ProtocolError(f"unknown op {op!r}")
        request = validate_exec(untrusted, fds)
        master = None
        if request["tty"] is not None:
            master, slave = _open_terminal(*request["tty"])
            _close_all(fds)
            fds = [slave, slave, slave]
        if master is None and min(fds) > 2:  # (the agent's own stdio holds 0 to 2)
            try:
                pid = _spawn_plain(request, fds)
            except OSError as exc:  # as a shell would: 127 not found, 126 not runnable
                code = 127 if isinstance(exc, FileNotFoundError) else 126
                reason = "command not found" if code == 127 else f"cannot run: {exc.strerror}"
                os.write(fds[2], f"qnix-agent: {reason}: {request['argv'][0]}\n".encode())
                send_message(conn, {"op": "exited", "code": code})
                return None
        else:
            pid = _spawn(request, fds)
        # On a terminal the host gets its master side: the host's own terminal never
        # enters the compartment.
        try:
            send_message(conn, {"op": "started", "pid": pid}, () if master is None else (master,))
        finally:
            if master is not None:
                os.close(master)
        return pid
    except Exception as exc:  # whatever a malformed request provokes, the agent goes on
        try:  # noqa: SIM105 - contextlib stays off the fast path
            send_message(conn, {"op": "error", "message": str(exc)[:512]})
        except OSError:
            pass
        return None
    finally:
        _close_all(fds)


def _report_end(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    try:  # noqa: SIM105 - contextlib stays off the fast path
        send_message(conn, {"op": "exited", "code": _exit_code(status)})
    except OSError:
        pass  # the host went away; the command's end is all there was to tell
    conn.close()


def listen_at(socket_path: str, backlog: int = 64) -> socket.socket:
    """A unix socket listening at `socket_path` (0600; a stale one there is replaced)."""
    server = bound_socket(socket_path)
    server.listen(backlog)
    return server


def bound_socket(socket_path: str) -> socket.socket:
    """A unix socket bound at `socket_path` (0600; a stale one there is replaced), not yet
    listening: the keeper binds the agent's socket where only root can reach it and hands
    it to the agent, whose listen() makes SO_PEERCRED name the agent's uid."""
    import socket

    try:  # noqa: SIM105 - contextlib stays off the fast path
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(socket_path)
    finally:
        os.umask(old_umask)
    return server


def _end_abandoned(pid: int) -> None:
    """The command's client went away (`qnix run` killed, the broker gone): end the command
    and its process group, as nobody can read its output or give it input any more."""
    import signal

    try:  # noqa: SIM105 - contextlib stays off the fast path
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve(listen_fd: int) -> None:
    """Listen on the bound socket at descriptor `listen_fd`; start each request's command and
    report its end. One process: no fork per connection, only the command's own (each
    request costs one fork). A client that closes its connection (or speaks out of turn)
    before its command has ended takes the command with it."""
    # Whatever the sandbox's setup left open: commands inherit nothing.
    os.closerange(3, listen_fd)
    os.closerange(listen_fd + 1, 65536)
    os.set_inheritable(listen_fd, False)
    listener = _socket.socket(fileno=listen_fd)
    listener.listen(64)
    listener.detach()  # the socket module wraps it below, once it is loaded
    # The host waits for this line before it reports the compartment as running; the modules
    # requests need load while it travels to the client and the client's request comes back.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    import json  # noqa: F401 - for the first request
    import select
    import signal
    import socket
    import warnings  # noqa: F401 - os.execvpe imports it: once here, not in every command

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    server = socket.socket(fileno=listen_fd)
    running: dict[int, tuple[int, socket.socket | None]] = {}  # pidfd -> (pid, connection)
    clients: dict[int, int] = {}  # a running command's connection -> its pidfd
    listening = server.fileno()
    while True:
        readable, _, _ = select.select([listening, *running, *clients], [], [])
        for fd in readable:
            if fd in running:  # a command ended
                pid, conn = running.pop(fd)
                os.close(fd)
                if conn is None:
                    os.waitpid(pid, 0)  # its client had gone: only the zombie is left
                else:
                    del clients[conn.fileno()]
                    _report_end(pid, conn)
            elif fd in clients:  # closed before its command ended: nobody is left to serve
                pidfd = clients.pop(fd)
                pid, conn = running[pidfd]
                _end_abandoned(pid)
                if conn is not None:
                    conn.close()
                running[pidfd] = (pid, None)  # reaped once it has ended
        if listening in readable:
            conn, _ = server.accept()
            started = _start_request(conn)
            if started is None:
                conn.close()
            else:
                conn.settimeout(None)
                pidfd = os.pidfd_open(started)
                running[pidfd] = (started, conn)
                clients[conn.fileno()] = pidfd


# ---- the host-side client --------------------------------------------------------------------


class AgentError(Exception):
    pass


def uid_of_peer(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    credentials = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, UCRED_SIZE)
    return int.from_bytes(credentials[4:8], sys.byteorder)


def connect(
    socket_path: str, timeout: float = 10.0, *, peer_uid: int | None = None
) -> _socket.socket:
    """A connection to the agent at `socket_path` (the caller closes it); with `peer_uid`,
    only if the process listening there runs as that (host) uid, whatever the socket file
    claims."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
        if peer_uid is not None:
            uid = uid_of_peer(sock)
            if uid != peer_uid:
                raise AgentError(
                    f"the socket at {socket_path} belongs to uid {uid}, not the compartment's"
                )
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot reach the agent at {socket_path}: {exc.strerror}") from None
    except AgentError:
        sock.close()
        raise
    return sock


def ping(socket_path: str, timeout: float = 5.0) -> int:
    sock = connect(socket_path, timeout)
    try:
        send_message(sock, {"op": "ping"})
        untrusted, fds = recv_message(sock)
        _close_all(fds)
    finally:
        sock.close()
    if untrusted.get("op") != "pong" or not isinstance(untrusted.get("pid"), int):
        raise AgentError(f"unexpected answer to ping: {untrusted.get('op')!r}")
    return int(untrusted["pid"])


def execute(
    socket_path: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    stdio: Sequence[int] = (0, 1, 2),
    peer_uid: int | None = None,
    terminal: bool = False,
    on_started: Callable[[int], None] | None = None,
) -> int:
    """Run argv in the compartment with our stdio; return its exit code (128+N for signal N).
    `peer_uid`: refuse unless the agent runs as this host uid (see connect). `on_started`
    gets the pid the agent reports for the command (in the compartment's pid namespace;
    untrusted: the agent runs inside).

    Our descriptors never enter the compartment: the command gets pipes of ours, relayed to
    `stdio` until it ends (StdioRelay), or — with `terminal` (stdin and stdout are our
    terminal) — a terminal of the compartment's own, relayed to ours in raw mode with its
    size. Either way nothing inside can touch our files once the command has ended."""
    sock = connect(socket_path, peer_uid=peer_uid)
    stdio_relay = None
    try:
        request = {"op": "exec", "argv": list(argv), "env": dict(env), "cwd": cwd}
        if terminal:
            from qnix.runtime import terminal as relay

            rows, cols = relay.size(stdio[1])
            send_message(sock, {**request, "tty": {"rows": rows, "cols": cols}})
        else:
            stdio_relay = StdioRelay(stdio)
            try:
                send_message(sock, request, stdio_relay.theirs)
            finally:
                stdio_relay.close_theirs()
        sock.settimeout(None)  # the command may run for as long as it likes
        while True:
            if stdio_relay is not None:
                stdio_relay.pump_until_readable(sock.fileno())
            untrusted, fds = recv_message(sock)
            op = untrusted.get("op")
            if op == "started" and on_started is not None:
                untrusted_pid = untrusted.get("pid")
                if not isinstance(untrusted_pid, int) or isinstance(untrusted_pid, bool):
                    _close_all(fds)
                    raise AgentError(f"agent reported a bad pid: {untrusted_pid!r}")
                on_started(untrusted_pid)
            if op == "started" and terminal:
                master = relay.checked_master(fds)
                try:
                    relay.relay(sock, master, stdio[0], stdio[1])
                finally:
                    os.close(master)
                continue
            _close_all(fds)
            if op == "started":
                continue
            if op == "exited":
                code = untrusted.get("code")
                if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
                    raise AgentError(f"agent reported a bad exit code: {code!r}")
                if stdio_relay is not None:
                    stdio_relay.finish()
                return code
            if op == "error":
                message = str(untrusted.get("message", ""))[:512]
                raise AgentError(f"the agent refused: {message}")
            raise AgentError(f"unexpected message from the agent: {op!r}")
    finally:
        if stdio_relay is not None:
            stdio_relay.close()
        sock.close()  # before the command ended: the agent ends it


RELAY_CHUNK = 1 << 16
SPLICE_CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # fewer turns of the relay for a big stream
# splice() cannot serve this pair of descriptors (EINVAL: a terminal, say): copy instead.
_NO_SPLICE = (errno.EINVAL, errno.ENOSYS)
# What is still read from an output pipe once the command has ended: what it wrote before it
# ended is there already; something it left running may go on writing, and is not waited for.
LEFTOVER_CAP = 1 << 20


def _unread(fd: int) -> int:
    """How many bytes wait in the pipe at `fd` (FIONREAD)."""
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, waiting while it would block (whoever holds a descriptor of
    ours may have made it non-blocking)."""
    import select

    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


class StdioRelay:
    """Three pipes between us and a command: the command gets their inner ends (`theirs`),
    we copy our stdin into one and the other two out to our stdout and stderr, until the
    command has ended (`finish`). Whatever the command leaves running then holds pipes to
    nobody: no file, terminal or pipe of the caller's is ever in the compartment.

    Input is taken only as fast as the command takes it (nothing of ours is read ahead beyond
    what its pipe holds); output is written as cat would write it, so a slow reader slows the
    command down rather than filling our memory. The bytes move in the kernel (splice)
    wherever both ends allow it (a terminal does not: then they are read and written). A
    reader of ours that has gone away closes the command's pipe: the command gets EPIPE (or
    SIGPIPE), as in a shell pipeline."""

    def __init__(self, stdio: Sequence[int]) -> None:
        import fcntl

        self.stdin, self.stdout, self.stderr = stdio[0], stdio[1], stdio[2]
        stdin_read, self.to_command = os.pipe2(os.O_CLOEXEC)
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        self.theirs: tuple[int, ...] = (stdin_read, stdout_write, stderr_write)
        self.outputs = {stdout_read: self.stdout, stderr_read: self.stderr}
        for fd in (self.to_command, stdout_read, stderr_read):
            os.set_blocking(fd, False)
            try:  # noqa: SIM105 - contextlib stays off the fast path
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over the user's pipe limit: the default size works too
        self.input_open = True
        self.pending = b""  # read from our stdin, not yet taken by the command
        self.room_wanted = False  # the command's stdin pipe was full
        self.splice_in = True
        self.splice_out = set(self.outputs)

    def close_theirs(self) -> None:
        """The agent holds its own copies once the request is sent."""
        _close_all(self.theirs)
        self.theirs = ()

    def pump_until_readable(self, watched: int) -> None:
        """Copy both ways until `watched` (the agent's connection) has something to say."""
        import select

        while True:
            poller = select.poll()
            poller.register(watched, select.POLLIN)
            for fd in self.outputs:
                poller.register(fd, select.POLLIN)
            if self.input_open:
                if self.pending or self.room_wanted:
                    poller.register(self.to_command, select.POLLOUT)
                else:
                    poller.register(self.stdin, select.POLLIN)
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            answered = False
            for fd, _ in ready:
                if fd == watched:
                    answered = True
                elif fd in self.outputs:
                    self._copy_out(fd)
                elif self.input_open and fd == self.to_command:
                    self.room_wanted = False
                    if self.pending:
                        self._give()
                elif self.input_open and fd == self.stdin:
                    self._take()
            if answered:
                return

    def _take(self) -> None:
        """What our stdin has now, into the command's pipe."""
        if self.splice_in:
            try:
                moved = os.splice(
                    self.stdin, self.to_command, SPLICE_CHUNK, flags=os.SPLICE_F_NONBLOCK
                )
            except BlockingIOError:  # its pipe is full (or our stdin had nothing after all)
                self.room_wanted = True
                return
            except OSError as exc:
                if exc.errno not in _NO_SPLICE:
                    self._end_input()  # the command closed its stdin, or ours is broken
                    return
                self.splice_in = False  # a terminal, say: read and write instead
            else:
                if not moved:
                    self._end_input()
                return
        try:
            self.pending = os.read(self.stdin, RELAY_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # our stdin is closed or broken: that is its end
            self.pending = b""
        if not self.pending:
            self._end_input()
        else:
            self._give()

    def _give(self) -> None:
        try:
            self.pending = self.pending[os.write(self.to_command, self.pending) :]
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin: the rest is not wanted
            self._end_input()

    def _end_input(self) -> None:
        self.input_open = False
        self.pending = b""
        os.close(self.to_command)

    def _copy_out(self, fd: int) -> int:
        """What an output pipe has now, to our side: how much, 0 if there was none (at the
        pipe's end, or our reader's, the pipe is closed)."""
        target = self.outputs[fd]
        if fd in self.splice_out:
            while True:
                try:
                    moved = os.splice(fd, target, SPLICE_CHUNK)
                except BlockingIOError:
                    # The kernel splices without waiting, as our end is non-blocking: the pipe
                    # was empty after all, or our side is full and must be waited for.
                    if not _unread(fd):
                        return 0
                    import select

                    select.select([], [target], [])
                    continue
                except OSError as exc:
                    if exc.errno in _NO_SPLICE:
                        self.splice_out.discard(fd)  # a terminal: read and write instead
                        return self._copy_out(fd)
                    moved = 0  # our reader has gone: the command's pipe breaks too
                break
            if moved:
                return moved
        else:
            try:
                chunk = os.read(fd, RELAY_CHUNK)
            except BlockingIOError:
                return 0
            if chunk:
                try:
                    _write_all(target, chunk)
                    return len(chunk)
                except OSError:  # our reader has gone: the command's pipe breaks too
                    pass
        del self.outputs[fd]
        os.close(fd)
        return 0

    def finish(self) -> None:
        """The command has ended, and what it wrote is in the pipes: copy that, then stop."""
        for fd in list(self.outputs):
            taken = 0
            while taken < LEFTOVER_CAP and fd in self.outputs:
                copied = self._copy_out(fd)
                if not copied:
                    break
                taken += copied
        self.close()

    def close(self) -> None:
        """Our ends of the pipes: the command, if it runs on, writes to nobody."""
        self.close_theirs()
        if self.input_open:
            self._end_input()
        _close_all(list(self.outputs))
        self.outputs = {}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve" or not sys.argv[2].isdigit():
        sys.stderr.write("usage: agent.py serve FD (a bound unix socket)\n")
        sys.exit(2)
    serve(int(sys.argv[2]))
