"""The agent channel of a VM compartment: a relay on the host and the agent in the guest, joined
by one virtio-serial port. This file holds the frames both ends speak and the guest's end; the
host's end is qnix.runtime.backends.vm_relay.

File descriptors cannot cross into a VM, so the host end (the relay, run by the keeper as the
compartment's host uid) answers the agent protocol of qnix.runtime.agent on the compartment's
usual agent socket, and carries each command's stdin, stdout and stderr as frames over the port.
The guest end (`guest`, this file run alone by the guest's init) sets the guest up from its
configuration, runs each command as the compartment's user and sends its output and exit code
back; on a terminal, the command gets a terminal of the guest's own and the client a raw one on
the host, whose size the relay passes on. Calls from inside (qnix/inside/call.py) take the other
direction: the guest serves the call socket, and the relay makes each call on the compartment's
call socket on the host, with pipes as its stdio. Only the standard library is used, so that
the file runs in the guest as it is. Until the guest's hello it loads no module beyond the few
the interpreter starts with: under TCG each one more costs the start tens of milliseconds, so
what commands need is imported where it is used, and loaded ahead right after the hello.

A frame: the channel (4 bytes, one per command), its kind (1 byte), the payload's length
(4 bytes, at most MAX_PAYLOAD) and the payload, all big-endian. What comes from the guest is
untrusted: a malformed frame ends the relay, and with it the compartment's agent channel.

Each channel's data flows under a window (`Window`, `Inbox`): a sender may have WINDOW bytes
unwritten at the other end, which grants more (CREDIT) as it writes them out. So neither end's
reading loop ever waits on a slow reader: one command whose output nobody reads holds up that
command alone, and what it has sent waits in at most WINDOW bytes of the relay's memory. A guest
that sends beyond its window breaks the protocol, and the relay ends.
"""

from __future__ import annotations

import _thread
import io
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

HELLO = 1  # guest -> host: the guest is set up; what the host sends from now on is served
OPEN = 2  # host -> guest: run a command (JSON: argv, env, cwd)
STDIN = 3  # host -> guest
STDIN_END = 4  # host -> guest
STDOUT = 5  # guest -> host
STDERR = 6  # guest -> host
EXIT = 7  # guest -> host: JSON {"code": N}; the channel is done
RESIZE = 8  # host -> guest: JSON {"rows": R, "cols": C} of a command's terminal
# A call from inside (qnix/inside/call.py), on a channel the guest numbers from CALL_CHANNELS:
CALL_OPEN = 9  # guest -> host: JSON {"target", "service", "argument"}
CALL_STDIN = 10  # guest -> host
CALL_STDIN_END = 11  # guest -> host
CALL_STDOUT = 12  # host -> guest
CALL_STDERR = 13  # host -> guest
CALL_ANSWER = 14  # host -> guest: the call server's answer (JSON); exited/refused/error end it
CREDIT = 15  # either way: the sender of the channel's data may send this many bytes more
HANGUP = 16  # host -> guest: the command's client has gone; end the command
# A byte stream from a connection on the guest's GUI socket (waypipe's, see `Stream`), on a
# channel the guest numbers from STREAM_CHANNELS up to CALL_CHANNELS:
STREAM_OPEN = 17  # guest -> host
STREAM_DATA = 18  # either way
STREAM_END = 19  # either way: the sender reads no more from its socket
LAST_KIND = STREAM_END
DATA_KINDS = frozenset({STDIN, STDOUT, STDERR, CALL_STDIN, CALL_STDOUT, CALL_STDERR, STREAM_DATA})
STREAM_CHANNELS = 1 << 30
CALL_CHANNELS = 1 << 31
MAX_STREAMS = 64  # at once: each holds up to a window of the relay's memory
# The GUI: `waypipe --socket GUI_SOCKET_INSIDE server -- APP` in the guest connects here for
# each of APP's Wayland connections; the host's end is a `waypipe client` whose display is the
# compartment's Wayland filter. No GPU (no dmabuf to forward: the guest has no GPU, and the
# host's waypipe then parses no buffer formats from the guest); no compression (the link never
# leaves this machine: compressing would only spend the guest's CPU).
GUI_SOCKET_INSIDE = "/run/qnix-gui/waypipe.sock"
WAYPIPE_OPTIONS = ("--no-gpu", "--compress", "none")
FINAL_ANSWERS = ("exited", "refused", "error")
CALL_SOCKET_INSIDE = "/run/qnix-call/call.sock"  # where qnix/inside/call.py connects
HEADER_SIZE = 9
MAX_PAYLOAD = 64 * 1024
WINDOW = 4 * MAX_PAYLOAD  # a channel's data in flight, each way
QUIET_END = 10.0  # seconds a call's output may stay quiet after its service has exited
MAX_CHANNELS = 256
PORT_NAME = "qnix.agent"  # the virtio-serial port's name in the guest
CONFIG_INSIDE = "/qnix/config"  # the guest's configuration (`read_config`), in its initramfs


class LinkError(Exception):
    """A malformed frame, or the other end went away."""


def frame(channel: int, kind: int, payload: bytes = b"") -> bytes:
    return channel.to_bytes(4, "big") + bytes((kind,)) + len(payload).to_bytes(4, "big") + payload


class Link:
    """One end of the port: whole frames out under a lock, frames in from one reader."""

    def __init__(self, reader: io.RawIOBase, writer: io.RawIOBase) -> None:
        self.reader = reader
        self.writer = writer
        self.lock = _thread.allocate_lock()  # threading.Lock, without loading threading

    def send(self, channel: int, kind: int, payload: bytes = b"") -> None:
        view = memoryview(frame(channel, kind, payload))
        with self.lock:
            while view:
                view = view[self.writer.write(view) or 0 :]

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.reader.read(size - len(data))
            if not chunk:
                raise LinkError("the other end closed the port")
            data += chunk
        return data

    def receive(self) -> tuple[int, int, bytes]:
        header = self._exactly(HEADER_SIZE)
        channel = int.from_bytes(header[:4], "big")
        kind = header[4]
        size = int.from_bytes(header[5:], "big")
        if size > MAX_PAYLOAD or not HELLO <= kind <= LAST_KIND:
            raise LinkError(f"malformed frame (kind {kind}, {size} bytes)")
        return channel, kind, self._exactly(size)


class Window:
    """How much more of one channel's data this end may send now."""

    def __init__(self) -> None:
        import threading

        self.credit = WINDOW
        self.closed = False
        self.changed = threading.Condition()

    def take(self, size: int) -> bool:
        """Wait until `size` bytes may be sent and count them sent; False once closed."""
        with self.changed:
            self.changed.wait_for(lambda: self.closed or self.credit >= size)
            if self.closed:
                return False
            self.credit -= size
            return True

    def grant(self, untrusted_payload: bytes) -> None:
        with self.changed:
            self.credit += int.from_bytes(untrusted_payload[:4], "big")
            self.changed.notify_all()

    def close(self) -> None:
        """The channel is done: a sender waiting for credit gives up."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def send_data(link: Link, window: Window, channel: int, kind: int, chunk: bytes) -> None:
    """One chunk of a channel's data, when its window lets it go (dropped once it is closed)."""
    if window.take(len(chunk)):
        link.send(channel, kind, chunk)


class Inbox:
    """One channel's frames at the receiving end, in order: the reading loop puts them here
    and never waits; the channel's own thread takes them out (`take`) and, for data, grants
    the sender as much again once it is written out (`written`)."""

    def __init__(self, link: Link, channel: int) -> None:
        import queue

        self.link = link
        self.channel = channel
        self.frames: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self.room = WINDOW
        self.lock = _thread.allocate_lock()

    def put(self, kind: int, untrusted_payload: bytes) -> None:
        if kind in DATA_KINDS:
            with self.lock:
                if len(untrusted_payload) > self.room:
                    raise LinkError(f"channel {self.channel} sent beyond its window")
                self.room -= len(untrusted_payload)
        self.frames.put((kind, untrusted_payload))

    def take(self) -> tuple[int, bytes]:
        return self.frames.get()

    def written(self, size: int) -> None:
        """`size` bytes of data are out (or dropped, their reader gone): the sender may send
        as much again."""
        if not size:
            return
        with self.lock:
            self.room += size
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            self.link.send(self.channel, CREDIT, size.to_bytes(4, "big"))
        except (LinkError, OSError):
            pass


def feed_while(
    alive: Callable[[], bool],
    fd: int,
    send: Callable[[bytes], None],
    every_turn: Callable[[], None] = lambda: None,
) -> bool:
    """Copy what `fd` gives to `send` while `alive()`; True if `fd` ended (a terminal's or a
    caller's stdin may never end, so this looks up every 0.2 s, calling `every_turn`)."""
    import select

    while alive():
        ready = select.select([fd], [], [], 0.2)[0]
        every_turn()
        if not ready:
            continue
        chunk = os.read(fd, MAX_PAYLOAD)
        if not chunk:
            return True
        send(chunk)
    return False


def _message(payload: dict[str, Any]) -> bytes:
    import json

    body = json.dumps(payload, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def _pump(read: Callable[[], bytes], send: Callable[[bytes], None]) -> None:
    """Copy chunks from `read` to `send` until `read` returns b""."""
    while True:
        chunk = read()
        if not chunk:
            return
        send(chunk)


class Stream:
    """One stream at either end: a connected unix socket here, frames there. What the socket
    gives goes out as STREAM_DATA under the channel's window, then STREAM_END; what comes in is
    written to the socket (dropped, and granted, once that fails) until the other end's
    STREAM_END, which shuts the socket's sending side. Done, and the socket closed, when both
    directions are. `ended(channel)` is called then."""

    incoming = (STREAM_DATA, STREAM_END)

    def __init__(self, link: Link, channel: int, ended: Callable[[int], object]) -> None:
        self.link = link
        self.channel = channel
        self.inbox = Inbox(link, channel)
        self.window = Window()
        self.ended = ended
        self.left = 2  # directions still going
        self.lock = _thread.allocate_lock()

    def start(self, connect: Callable[[], Any]) -> None:
        """Both directions, in threads of their own, once `connect()` gives the socket (an
        OSError from it: no socket, so the stream ends at once and what comes is dropped)."""
        import threading

        threading.Thread(target=self._run, args=(connect,), daemon=True).start()

    def _run(self, connect: Callable[[], Any]) -> None:
        import threading

        try:
            sock = connect()
        except OSError:
            sock = None
        threading.Thread(target=self._write_out, args=(sock,), daemon=True).start()
        if sock is not None:
            while True:
                try:
                    chunk = sock.recv(MAX_PAYLOAD)
                except OSError:
                    break
                if not chunk:
                    break
                send_data(self.link, self.window, self.channel, STREAM_DATA, chunk)
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            self.link.send(self.channel, STREAM_END)
        except (LinkError, OSError):
            pass
        self._done(sock)

    def _write_out(self, sock: Any) -> None:
        writing = sock is not None
        while True:
            kind, chunk = self.inbox.take()
            if kind == STREAM_END:
                break
            if writing:
                try:
                    sock.sendall(chunk)
                except OSError:
                    writing = False
            self.inbox.written(len(chunk))
        if writing:
            try:  # noqa: SIM105 - contextlib is not loaded in the guest
                sock.shutdown(1)  # SHUT_WR: the other end has no more
            except OSError:
                pass
        self._done(sock)

    def _done(self, sock: Any) -> None:
        with self.lock:
            self.left -= 1
            if self.left:
                return
        self.window.close()
        if sock is not None:
            sock.close()
        self.ended(self.channel)


def gui_argv(argv: Sequence[str]) -> list[str]:
    """A GUI app in the guest: under waypipe's server, whose Wayland connections reach the
    host's filter through the guest's GUI socket."""
    return ["waypipe", *WAYPIPE_OPTIONS, "--socket", GUI_SOCKET_INSIDE, "server", "--", *argv]


# ---- the guest -----------------------------------------------------------------------------


def _port_device() -> str:
    """/dev/vportNpM of the port named PORT_NAME (no udev in the guest for the by-name link)."""
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)):
        with open(f"{base}/{entry}/name", encoding="utf-8") as handle:
            if handle.read().strip() == PORT_NAME:
                return f"/dev/{entry}"
    raise LinkError(f"no virtio-serial port named {PORT_NAME}")


def _spawn_failure_code(exc: OSError) -> int:
    """As a shell says it: 127 not found, 126 not runnable."""
    return 127 if isinstance(exc, FileNotFoundError) else 126


def _report_exit(link: Link, channel: int, code: int) -> None:
    """The command's end: its exit code to the host, and its stdin feeder stopped."""
    import json

    _GUEST_COMMANDS.pop(channel, None)
    link.send(channel, EXIT, json.dumps({"code": code & 0xFF}).encode())
    found = _GUEST_CHANNELS.pop(channel, None)
    if found is not None:
        inbox, window = found
        inbox.put(STDIN_END, b"")
        window.close()


def _feed_input(inbox: Inbox, write: Callable[[bytes], object]) -> None:
    """A command's stdin from the host until it ends; once the command stops reading it, the
    rest is dropped (and granted, so the host's feeder does not wait for nothing)."""
    reading = True
    while True:
        kind, chunk = inbox.take()
        if kind == STDIN_END:
            return
        if reading:
            try:
                write(chunk)
            except OSError:
                reading = False
        inbox.written(len(chunk))


def _guest_terminal(
    link: Link, channel: int, request: dict[str, Any], user: tuple[int, int]
) -> None:
    """Run one command on a terminal of the guest's own, as the compartment's user: it is the
    terminal's controlling process (job control, ^C); its output is the terminal's."""
    import fcntl
    import subprocess
    import termios
    import threading

    inbox, window = _GUEST_CHANNELS[channel]
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (request["tty"]["rows"], request["tty"]["cols"]))
    _GUEST_TERMINALS[channel] = master

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        process = subprocess.Popen(
            request["argv"],
            env=request["env"],
            cwd=request["cwd"] or "/",
            stdin=slave,
            stdout=slave,
            stderr=slave,
            user=user[0],
            group=user[1],
            extra_groups=[],
            start_new_session=True,
            preexec_fn=take_terminal,  # the guest agent runs nothing else that forks
        )
    except OSError as exc:
        os.close(slave)
        _GUEST_TERMINALS.pop(channel, None)
        os.close(master)
        message = f"qnix-agent: cannot run {request['argv'][0]}: {exc.strerror}\r\n"
        send_data(link, window, channel, STDOUT, message.encode()[:MAX_PAYLOAD])
        _report_exit(link, channel, _spawn_failure_code(exc))
        return
    os.close(slave)
    _GUEST_COMMANDS[channel] = process.pid
    threading.Thread(
        target=_feed_input, args=(inbox, lambda chunk: write_all(master, chunk)), daemon=True
    ).start()

    def read() -> bytes:
        try:
            return os.read(master, MAX_PAYLOAD)
        except OSError:  # EIO: the command and everything it started closed the terminal
            return b""

    _pump(read, lambda chunk: send_data(link, window, channel, STDOUT, chunk))
    status = process.wait()
    _GUEST_TERMINALS.pop(channel, None)
    os.close(master)
    _report_exit(link, channel, status if status >= 0 else 128 - status)


def _guest_run(link: Link, channel: int, request: dict[str, Any], user: tuple[int, int]) -> None:
    """Run one command as the compartment's user; report its output and exit code."""
    import subprocess
    import threading

    if request.get("tty") is not None:
        _guest_terminal(link, channel, request, user)
        return
    inbox, window = _GUEST_CHANNELS[channel]
    try:
        process = subprocess.Popen(
            request["argv"],
            env=request["env"],
            cwd=request["cwd"] or "/",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            user=user[0],
            group=user[1],
            extra_groups=[],
            start_new_session=True,
        )
    except OSError as exc:
        message = f"qnix-agent: cannot run {request['argv'][0]}: {exc.strerror}\n"
        send_data(link, window, channel, STDERR, message.encode()[:MAX_PAYLOAD])
        _report_exit(link, channel, _spawn_failure_code(exc))
        return
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    _GUEST_COMMANDS[channel] = process.pid

    def feed() -> None:
        stdin = process.stdin
        assert stdin is not None

        def write(chunk: bytes) -> None:
            stdin.write(chunk)
            stdin.flush()

        _feed_input(inbox, write)
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            stdin.close()
        except OSError:
            pass

    exited_read, exited_write = os.pipe()
    outputs = [(process.stdout, STDOUT), (process.stderr, STDERR)]
    workers = [
        threading.Thread(target=feed, daemon=True),
        *(
            threading.Thread(
                target=_drain_until_exit,
                args=(link, window, channel, stream.fileno(), kind, exited_read),
                daemon=True,
            )
            for stream, kind in outputs
        ),
    ]
    for worker in workers:
        worker.start()
    status = process.wait()
    os.close(exited_write)
    for worker in workers[1:]:
        worker.join()
    os.close(exited_read)
    for stream, _ in outputs:  # what it left running writes to nobody from now on
        stream.close()
    _report_exit(link, channel, status if status >= 0 else 128 - status)


def _drain_until_exit(
    link: Link, window: Window, channel: int, fd: int, kind: int, exited: int
) -> None:
    """A command's stdout or stderr to the host until the pipe ends or, once the command has
    exited (`exited` readable), until it is empty: its end is its exit, as for any agent, and
    what it left running does not hold the end up. What it wrote before it exited goes out:
    each chunk is sent before the pipe is looked at again."""
    import select

    has_exited = False
    while True:
        if has_exited:  # only what is in the pipe now: no more waiting
            readable = select.select([fd], [], [], 0)[0]
        else:
            readable = select.select([fd, exited], [], [])[0]
        if fd not in readable:
            if has_exited:
                return
            has_exited = True
            continue
        chunk = os.read(fd, MAX_PAYLOAD)
        if not chunk:
            return
        send_data(link, window, channel, kind, chunk)


# channel -> what comes in on it and the window of what goes out: commands and calls alike.
_GUEST_CHANNELS: dict[int, tuple[Inbox, Window]] = {}
# channel -> the pid of its command, which leads a process group of its own, while it runs.
_GUEST_COMMANDS: dict[int, int] = {}


def _hang_up(channel: int) -> None:
    """The command's client has gone on the host: end the command and its process group."""
    import signal

    pid = _GUEST_COMMANDS.get(channel)
    if pid is not None:
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _serve_calls(link: Link, user: tuple[int, int]) -> None:
    """The call socket inside the guest: each connection becomes a call on a channel of its
    own, decided and served on the host (its call server sees the compartment as the caller)."""
    import socket
    import threading

    os.makedirs(os.path.dirname(CALL_SOCKET_INSIDE), mode=0o755, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(CALL_SOCKET_INSIDE)
    os.chown(CALL_SOCKET_INSIDE, *user)
    os.chmod(CALL_SOCKET_INSIDE, 0o600)
    server.listen(16)
    numbers = iter(range(CALL_CHANNELS, 2 * CALL_CHANNELS))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            channel = next(numbers)
            threading.Thread(target=_guest_call, args=(link, conn, channel), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def _guest_call(link: Link, conn: Any, channel: int) -> None:
    import json
    import socket
    import threading

    fds: list[int] = []
    try:
        conn.settimeout(10)
        size_bytes, fds, _, _ = socket.recv_fds(conn, 4, 3)
        if len(size_bytes) < 4:
            size_bytes += conn.recv(4 - len(size_bytes))
        size = int.from_bytes(size_bytes, "big")
        body = b""
        while len(body) < min(size, MAX_PAYLOAD):
            chunk = conn.recv(size - len(body))
            if not chunk:
                break
            body += chunk
        request = json.loads(body)
        fields = {key: request.get(key) for key in ("target", "service", "argument")}
        if len(fds) != 3 or not all(isinstance(value, str) for value in fields.values()):
            raise ValueError("a call is a request with three descriptors")
    except (OSError, ValueError):
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            conn.sendall(_message({"op": "error", "message": "malformed call"}))
        except OSError:
            pass
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    conn.settimeout(None)
    inbox, window = Inbox(link, channel), Window()
    _GUEST_CHANNELS[channel] = (inbox, window)
    threading.Thread(target=_answer_call, args=(conn, fds, inbox, window), daemon=True).start()
    link.send(channel, CALL_OPEN, json.dumps(fields).encode())
    if feed_while(
        lambda: channel in _GUEST_CHANNELS,
        fds[0],
        lambda chunk: send_data(link, window, channel, CALL_STDIN, chunk),
    ):
        link.send(channel, CALL_STDIN_END)
    os.close(fds[0])


def _answer_call(conn: Any, fds: list[int], inbox: Inbox, window: Window) -> None:
    """The host's answers and the service's output, to the caller, until the call ends."""
    import json

    while True:
        kind, payload = inbox.take()
        if kind in (CALL_STDOUT, CALL_STDERR):
            try:  # noqa: SIM105 - contextlib is not loaded in the guest
                write_all(fds[1 if kind == CALL_STDOUT else 2], payload)
            except OSError:
                pass
            inbox.written(len(payload))
            continue
        answer = json.loads(payload)
        try:  # noqa: SIM105 - contextlib is not loaded in the guest
            conn.sendall(_message(answer))
        except OSError:
            pass
        if answer.get("op") in FINAL_ANSWERS:
            _GUEST_CHANNELS.pop(inbox.channel, None)
            window.close()
            conn.close()
            for fd in set(fds[1:]) - {fds[0]}:  # stdin is its feeder's to close
                os.close(fd)
            return


_GUEST_TERMINALS: dict[int, int] = {}  # channel -> its terminal's master
_GUEST_STREAMS: dict[int, Stream] = {}  # channel -> a connection on the GUI socket


def _given(sock: Any) -> Callable[[], Any]:
    return lambda: sock


def _serve_streams(link: Link, user: tuple[int, int]) -> None:
    """The GUI socket inside the guest (only the user's): each connection waypipe's server
    makes becomes a stream to the host, where the relay joins it to the host's waypipe client.
    Beyond MAX_STREAMS at once a connection is closed unanswered."""
    import socket
    import threading

    os.makedirs(os.path.dirname(GUI_SOCKET_INSIDE), mode=0o755, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(GUI_SOCKET_INSIDE)
    os.chown(GUI_SOCKET_INSIDE, *user)
    os.chmod(GUI_SOCKET_INSIDE, 0o600)
    server.listen(16)
    numbers = iter(range(STREAM_CHANNELS, CALL_CHANNELS))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            if len(_GUEST_STREAMS) >= MAX_STREAMS:
                conn.close()
                continue
            channel = next(numbers)
            stream = Stream(link, channel, lambda ended: _GUEST_STREAMS.pop(ended, None))
            _GUEST_STREAMS[channel] = stream  # before the host can answer its open
            link.send(channel, STREAM_OPEN)
            stream.start(_given(conn))

    threading.Thread(target=serve, daemon=True).start()


def read_config(text: str) -> dict[str, str]:
    """The guest's configuration: one `key=value` a line, as qnix.runtime.backends.vm writes
    it (not JSON: loading json costs a TCG guest a tenth of a second before its hello)."""
    return dict(line.partition("=")[::2] for line in text.splitlines() if line)


def _busybox(*argv: str) -> None:
    """A busybox applet, waited for (not through subprocess, which the hello does not wait
    to load)."""
    pid = os.posix_spawn("/bin/busybox", ["busybox", *argv], os.environ)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise OSError(f"{' '.join(argv)}: exit code {code}")


def _set_up_guest(config: dict[str, str]) -> tuple[int, int]:
    """What the guest's init leaves to the agent: its user, home, secrets, name and network."""
    uid = gid = int(config["uid"])
    user, home = config["user"], config["home"]
    with open("/etc/passwd", "a", encoding="utf-8") as handle:
        handle.write(f"{user}:x:{uid}:{gid}::{home}:/bin/sh\n")
    with open("/etc/group", "a", encoding="utf-8") as handle:
        handle.write(f"{user}:x:{gid}:\n")
    os.makedirs(home, exist_ok=True)
    # The user's runtime folder (XDG_RUNTIME_DIR of its commands): waypipe's server puts the
    # display socket of its app there.
    os.makedirs(config["runtime_dir"], mode=0o700)
    os.chown(config["runtime_dir"], uid, gid)
    if config["home_share"] == "yes":
        # Uncached (no cache= option): a write is on the host when it returns, so a VM that
        # is stopped at once loses nothing written before.
        _busybox(
            "mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=262144", "home", home
        )
    else:
        _busybox("mount", "-t", "tmpfs", "-o", "mode=0700", "home", home)
        os.chown(home, uid, gid)
    for folder, _, files in os.walk("/run/secrets"):
        for name in files:
            os.chown(os.path.join(folder, name), uid, gid)
    with open("/proc/sys/kernel/hostname", "w", encoding="utf-8") as handle:
        handle.write(config["hostname"])
    _busybox("ip", "link", "set", "lo", "up")
    address = config["address"]
    if address:
        _busybox("ip", "link", "set", "eth0", "up")
        _busybox("ip", "addr", "add", f"{address}/31", "dev", "eth0")
        _busybox("ip", "route", "add", "default", "via", config["gateway"])
    return uid, gid


def guest() -> None:
    """The guest's agent: set the guest up, say hello, then run what the host sends."""
    with open(CONFIG_INSIDE, encoding="utf-8") as handle:
        config = read_config(handle.read())
    user = _set_up_guest(config)
    device = _port_device()
    os.write(2, f"qnix: set up, saying hello on {device}\n".encode())  # the console
    port = io.FileIO(device, "r+")  # a port opens once: one descriptor both ways
    link = Link(port, port)
    link.send(0, HELLO)
    os.write(2, b"qnix: said hello\n")
    # The host's frames wait in the port meanwhile: the call socket is there before any
    # command runs, and what every command needs is loaded before the first one arrives.
    _serve_calls(link, user)
    if config["gui"] == "yes":
        _serve_streams(link, user)
    import json
    import queue  # noqa: F401 - for the first command
    import select  # noqa: F401 - for the first command
    import subprocess  # noqa: F401 - for the first command
    import threading

    while True:
        channel, kind, payload = link.receive()
        found = _GUEST_CHANNELS.get(channel)
        if kind == OPEN and found is None and channel < CALL_CHANNELS:
            _GUEST_CHANNELS[channel] = (Inbox(link, channel), Window())
            request = json.loads(payload)
            threading.Thread(
                target=_guest_run, args=(link, channel, request, user), daemon=True
            ).start()
        elif kind == CREDIT and found is not None:
            found[1].grant(payload)
        elif kind in (CREDIT, STREAM_DATA, STREAM_END) and (stream := _GUEST_STREAMS.get(channel)):
            if kind == CREDIT:
                stream.window.grant(payload)
            else:
                stream.inbox.put(kind, payload)
        elif kind == HANGUP:
            _hang_up(channel)
        elif (
            kind in (STDIN, STDIN_END, CALL_STDOUT, CALL_STDERR, CALL_ANSWER) and found is not None
        ):
            found[0].put(kind, payload)
        elif kind == RESIZE and channel in _GUEST_TERMINALS:
            import termios

            size = json.loads(payload)
            try:  # noqa: SIM105 - contextlib is not loaded in the guest
                termios.tcsetwinsize(_GUEST_TERMINALS[channel], (size["rows"], size["cols"]))
            except (OSError, termios.error):
                pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    if sys.argv[1:] == ["guest"]:
        guest()
    else:
        sys.stderr.write("usage: vmlink.py guest\n")
        sys.exit(2)
