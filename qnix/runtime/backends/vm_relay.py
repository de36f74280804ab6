"""The host end of a VM compartment's agent channel (qnix.runtime.vmlink has the frames and the
guest end): run by the keeper as the compartment's host uid, it answers the agent protocol of
qnix.runtime.agent on the compartment's usual agent socket and carries each command's stdin,
stdout and stderr as frames over the virtio-serial port; calls from inside come the other way
and are made on the compartment's call socket on the host; so do the streams of a GUI
compartment's Wayland connections (waypipe's server in the guest), each joined to a
connection of its own on the host's `waypipe client`, whose display is the compartment's
Wayland filter. What comes from the guest is untrusted: a malformed frame ends the relay, and
with it the compartment's agent channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import termios
import threading

from qnix.runtime.vmlink import (
    CALL_ANSWER,
    CALL_CHANNELS,
    CALL_OPEN,
    CALL_STDERR,
    CALL_STDIN,
    CALL_STDIN_END,
    CALL_STDOUT,
    CREDIT,
    EXIT,
    FINAL_ANSWERS,
    HANGUP,
    HELLO,
    MAX_CHANNELS,
    MAX_PAYLOAD,
    MAX_STREAMS,
    OPEN,
    QUIET_END,
    RESIZE,
    STDERR,
    STDIN,
    STDIN_END,
    STDOUT,
    STREAM_CHANNELS,
    STREAM_END,
    STREAM_OPEN,
    Inbox,
    Link,
    LinkError,
    Stream,
    Window,
    feed_while,
    send_data,
    write_all,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket


class _Command:
    """A command the relay carries: its client, the stdio it gave, and its channel's flow."""

    incoming = (STDOUT, STDERR, EXIT)

    def __init__(self, link: Link, channel: int, conn: socket.socket, fds: list[int]) -> None:
        self.channel = channel
        self.conn = conn
        self.fds = fds
        self.inbox = Inbox(link, channel)  # its output and exit, from the guest
        self.window = Window()  # its stdin, to the guest


class _Call:
    """A call from the guest the relay makes on the host: its stdin in, its output out."""

    incoming = (CALL_STDIN, CALL_STDIN_END)

    def __init__(self, link: Link, channel: int) -> None:
        self.inbox = Inbox(link, channel)
        self.window = Window()


class Relay:
    """The host end: the agent protocol on the agent socket, frames on the port."""

    def __init__(self, link: Link, call_socket: str, gui_socket: str | None = None) -> None:
        """`gui_socket`: the host's waypipe client's socket (None: the compartment has no
        display, and every stream ends at once)."""
        self.link = link
        self.call_socket = call_socket
        self.gui_socket = gui_socket
        self.lock = threading.Lock()
        self.commands: dict[int, _Command] = {}
        self.next_channel = 1
        self.calls: dict[int, _Call] = {}
        self.streams: dict[int, Stream] = {}

    def serve(self, server: socket.socket) -> None:
        """Accept agent connections, each in a thread of its own."""
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        from qnix.runtime import agent

        fds: list[int] = []
        command = None
        master = None
        try:
            conn.settimeout(agent.REQUEST_TIMEOUT)
            untrusted, fds = agent.recv_message(conn)
            if untrusted["op"] == "ping":
                agent.send_message(conn, {"op": "pong", "pid": os.getpid()})
                conn.close()
                return
            if untrusted["op"] != "exec":
                raise agent.ProtocolError(f"unknown op {untrusted['op']!r}")
            request = agent.validate_exec(untrusted, fds)
            if request["tty"] is not None:
                # The client gets the master of a terminal here, whose other side (raw: the
                # guest's own terminal does the line discipline) is the command's stdio.
                import tty

                master, slave = os.openpty()
                tty.setraw(slave)
                rows, cols = request["tty"]
                termios.tcsetwinsize(master, (rows, cols))
                fds = [slave, slave, slave]
            with self.lock:
                if len(self.commands) >= MAX_CHANNELS:
                    raise agent.ProtocolError("too many commands at once")
                channel = self.next_channel
                self.next_channel += 1
                command = _Command(self.link, channel, conn, fds)
                self.commands[channel] = command
            opened = {"argv": request["argv"], "env": request["env"], "cwd": request["cwd"]}
            if request["tty"] is not None:
                opened["tty"] = {"rows": request["tty"][0], "cols": request["tty"][1]}
            self.link.send(channel, OPEN, json.dumps(opened).encode())
            conn.settimeout(None)
            agent.send_message(conn, {"op": "started", "pid": channel}, [master] if master else [])
        except Exception as exc:  # whatever a client sends, the relay goes on
            with contextlib.suppress(OSError):
                agent.send_message(conn, {"op": "error", "message": str(exc)[:512]})
            conn.close()
            for fd in set(fds):
                os.close(fd)
            if command is None:
                return
            # The command may run already: it runs on, its output dropped, as with any agent.
            command.fds = []
            with contextlib.suppress(LinkError, OSError):
                self.link.send(command.channel, STDIN_END)
        finally:
            if master is not None:
                os.close(master)
        threading.Thread(target=self._deliver, args=(command,), daemon=True).start()
        threading.Thread(target=self._watch_client, args=(command,), daemon=True).start()
        if command.fds:
            self._feed(command, terminal=request["tty"] is not None)
            os.close(command.fds[0])  # stdout and stderr: closed when the command has exited

    def _feed(self, command: _Command, *, terminal: bool) -> None:
        """The client's stdin to the command, until it ends or the command has exited (a
        terminal's stdin may never end); on a terminal also its size when it changes."""
        channel, stdin = command.channel, command.fds[0]
        sizes = [termios.tcgetwinsize(stdin)] if terminal else []

        def follow_size() -> None:
            if sizes and (now := termios.tcgetwinsize(stdin)) != sizes[0]:
                sizes[0] = now
                resized = {"rows": now[0], "cols": now[1]}
                self.link.send(channel, RESIZE, json.dumps(resized).encode())

        if feed_while(
            lambda: channel in self.commands,
            stdin,
            lambda chunk: send_data(self.link, command.window, channel, STDIN, chunk),
            follow_size,
        ):
            self.link.send(channel, STDIN_END)

    def _watch_client(self, command: _Command) -> None:
        """A client that closes its connection (or speaks) before its command has ended —
        `qnix run` killed — ends the command in the guest."""
        import select

        watched = command.conn.fileno()
        while True:
            with self.lock:
                if command.channel not in self.commands:
                    return  # ended: _exited closes the connection
            try:
                if not select.select([watched], [], [], 0.5)[0]:
                    continue
            except (OSError, ValueError):
                return  # closed under us, by _exited
            with self.lock:
                running = command.channel in self.commands
            if running:
                with contextlib.suppress(LinkError, OSError):
                    self.link.send(command.channel, HANGUP)
            return

    def _deliver(self, command: _Command) -> None:
        """The command's output to its client, as fast as the client reads it; then its exit."""
        while True:
            kind, payload = command.inbox.take()
            if kind == EXIT:
                self._exited(command, payload)
                return
            if command.fds:
                # A reader that went away: the command runs on, as with any agent.
                with contextlib.suppress(OSError):
                    write_all(command.fds[1 if kind == STDOUT else 2], payload)
            command.inbox.written(len(payload))

    def dispatch(self) -> None:
        """Route the guest's frames to their commands and calls until the port closes; it
        never waits on a client or a service, only on the port."""
        while True:
            channel, kind, payload = self.link.receive()
            if kind == CALL_OPEN and channel >= CALL_CHANNELS and channel not in self.calls:
                if len(self.calls) >= MAX_CHANNELS:
                    refused = {"op": "refused", "message": "too many calls at once"}
                    self.link.send(channel, CALL_ANSWER, json.dumps(refused).encode())
                    continue
                self.calls[channel] = _Call(self.link, channel)
                threading.Thread(target=self._call, args=(channel, payload), daemon=True).start()
                continue
            if kind == STREAM_OPEN:
                self._open_stream(channel)
                continue
            with self.lock:
                flow = (
                    self.commands.get(channel)
                    or self.calls.get(channel)
                    or self.streams.get(channel)
                )
            if flow is None:
                continue  # a channel that has ended
            if kind == CREDIT:
                flow.window.grant(payload)
            elif kind in flow.incoming:
                flow.inbox.put(kind, payload)

    def _open_stream(self, untrusted_channel: int) -> None:
        """A Wayland connection in the guest: joined to a new connection on the host's waypipe
        client. One on a channel outside the guest's range, or on one still open, is malformed;
        beyond MAX_STREAMS at once it is ended at once (the guest holds to that limit)."""
        if not STREAM_CHANNELS <= untrusted_channel < CALL_CHANNELS:
            raise LinkError(f"a stream opened on channel {untrusted_channel}")
        stream = None
        with self.lock:
            if untrusted_channel in self.streams:
                raise LinkError(f"stream {untrusted_channel} opened twice")
            if len(self.streams) < MAX_STREAMS:
                stream = Stream(self.link, untrusted_channel, self._stream_ended)
                self.streams[untrusted_channel] = stream
        if stream is None:
            self.link.send(untrusted_channel, STREAM_END)
        else:
            stream.start(self._connect_gui)

    def _connect_gui(self) -> socket.socket:
        import socket

        if self.gui_socket is None:
            raise OSError("this compartment has no display")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(self.gui_socket)
        except OSError:
            client.close()
            raise
        return client

    def _stream_ended(self, channel: int) -> None:
        with self.lock:
            self.streams.pop(channel, None)

    def _call(self, channel: int, untrusted_payload: bytes) -> None:
        """A call from the guest, made on the compartment's call socket with pipes as its
        stdio; the call server's answers and the service's output go back as frames."""
        import select
        import socket
        import time

        from qnix.runtime import agent

        call = self.calls[channel]
        ended = threading.Event()  # the service has exited: its output ends at a quiet pipe
        ends: list[int] = []
        try:
            untrusted = json.loads(untrusted_payload)
            request = {"op": "call"}
            for key in ("target", "service", "argument"):
                value = untrusted[key] if isinstance(untrusted, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"a call without a {key}")
                request[key] = value
            stdin_read, stdin_write = os.pipe()
            stdout_read, stdout_write = os.pipe()
            stderr_read, stderr_write = os.pipe()
            ends = [stdin_read, stdin_write, stdout_read, stdout_write, stderr_read, stderr_write]
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.call_socket)
            agent.send_message(server, request, [stdin_read, stdout_write, stderr_write])
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
                ends.remove(fd)

            def feed() -> None:
                reading = True
                while (taken := call.inbox.take())[0] != CALL_STDIN_END:
                    if reading:
                        try:
                            write_all(stdin_write, taken[1])
                        except OSError:
                            reading = False  # the service closed its stdin: the rest is dropped
                    call.inbox.written(len(taken[1]))
                os.close(stdin_write)

            def drain(fd: int, kind: int) -> None:
                # Until the end of the pipe; once the service has exited, also until it has
                # been quiet a while (something it left running may hold the pipe open).
                quiet_since = None
                while True:
                    if not select.select([fd], [], [], 0.5)[0]:
                        now = time.monotonic()
                        quiet_since = quiet_since or now
                        if ended.is_set() and now - quiet_since > QUIET_END:
                            break
                        continue
                    quiet_since = None
                    chunk = os.read(fd, MAX_PAYLOAD)
                    if not chunk:
                        break
                    send_data(self.link, call.window, channel, kind, chunk)
                os.close(fd)

            ends = []  # each is its thread's to close now
            threading.Thread(target=feed, daemon=True).start()
            drains = [
                threading.Thread(target=drain, args=(stdout_read, CALL_STDOUT), daemon=True),
                threading.Thread(target=drain, args=(stderr_read, CALL_STDERR), daemon=True),
            ]
            for worker in drains:
                worker.start()
            with server:
                while True:
                    answer, fds = agent.recv_message(server)
                    for fd in fds:
                        os.close(fd)
                    if answer.get("op") in FINAL_ANSWERS:
                        ended.set()
                        for worker in drains:  # all output before the end
                            worker.join()
                    self.link.send(channel, CALL_ANSWER, json.dumps(answer).encode())
                    if answer.get("op") in FINAL_ANSWERS:
                        return
        except Exception as exc:  # any failure ends the call, refused
            message = {"op": "error", "message": f"the call failed on the host: {exc}"[:512]}
            with contextlib.suppress(LinkError, OSError):
                self.link.send(channel, CALL_ANSWER, json.dumps(message).encode())
        finally:
            for fd in ends:
                os.close(fd)
            with self.lock:
                self.calls.pop(channel, None)
            call.inbox.put(CALL_STDIN_END, b"")
            call.window.close()

    def _exited(self, command: _Command, payload: bytes) -> None:
        from qnix.runtime import agent

        with self.lock:
            self.commands.pop(command.channel, None)
        command.window.close()
        try:
            untrusted_code = json.loads(payload)["code"]
            agent.send_message(command.conn, {"op": "exited", "code": int(untrusted_code)})
        except Exception:  # noqa: S110 - whatever the guest reported, the channel ends here
            pass
        finally:
            command.conn.close()
            fds = command.fds
            for fd in set(fds[1:]) - set(fds[:1]):  # stdin is its feeder's to close
                os.close(fd)


def _die_with_parent() -> None:
    """SIGTERM when the keeper dies (also by SIGKILL): see _end_qemu_with_us."""
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(1)  # the keeper died before the line above


def _end_qemu_with_us(pidfds: list[int]) -> None:
    """QEMU drops to our uid, which clears any parent-death signal of its own: so when we are
    told to end, the VM at the other end of the port ends first, and so does the host's
    waypipe client of a GUI VM (pidfds: never another process that took a pid)."""
    import signal

    def end(number: int, frame: object) -> None:
        for pidfd in pidfds:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, end)


def relay(
    listen_fd: int,
    port_fd: int,
    pidfds: list[int],
    call_socket: str,
    uid: int,
    gid: int,
    gui_socket: str | None = None,
) -> None:
    """The host end, started as root beside QEMU and running as `uid`: it waits for the
    guest's hello on the agent port (descriptor `port_fd`, a socket joined to QEMU's
    chardev), then serves the agent socket the keeper bound (descriptor `listen_fd`; says
    "ready") until the port closes. `pidfds` are QEMU's and, for a GUI VM, its waypipe
    client's, which end with us; `gui_socket` is that client's socket."""
    # Everything it will use is imported now: `uid` may not reach the interpreter's files.
    import ctypes  # noqa: F401
    import queue  # noqa: F401 - vmlink's Inbox loads it when it is first used
    import select  # noqa: F401
    import signal  # noqa: F401
    import socket
    import time  # noqa: F401
    import tty  # noqa: F401

    from qnix.runtime import agent  # noqa: F401

    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    _end_qemu_with_us(pidfds)
    _die_with_parent()
    port = socket.socket(fileno=port_fd)
    link = Link(socket.SocketIO(port, "r"), socket.SocketIO(port, "w"))
    channel, kind, _ = link.receive()
    if (channel, kind) != (0, HELLO):
        raise LinkError("the guest did not say hello")
    server = socket.socket(fileno=listen_fd)
    server.listen(64)  # as `uid`: SO_PEERCRED names the compartment's uid, as for any agent
    bridge = Relay(link, call_socket, gui_socket)
    threading.Thread(target=bridge.serve, args=(server,), daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with contextlib.suppress(LinkError):  # the VM is gone: so is its agent channel
        bridge.dispatch()


if __name__ == "__main__":
    if len(sys.argv) == 8:
        listen_fd, port_fd = int(sys.argv[1]), int(sys.argv[2])
        relay(
            listen_fd,
            port_fd,
            [int(pidfd) for pidfd in sys.argv[3].split(",")],
            sys.argv[4],
            int(sys.argv[5]),
            int(sys.argv[6]),
            sys.argv[7] or None,
        )
    else:
        sys.stderr.write("usage: vm_relay.py FD PORT_FD PIDFD[,PIDFD] CALLS UID GID GUI|''\n")
        sys.exit(2)
