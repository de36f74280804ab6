"""The Wayland filter of one compartment: a host process between the compartment's clients and
the compositor.

It listens on a socket the compartment sees as its only Wayland display; for each client that
connects it opens one connection to the compositor and passes messages both ways through a
qnix.wayland.rules.Session. A client that sends anything the rules refuse, malformed bytes,
too many descriptors or more than it reads is disconnected alone: the other clients and the
compositor carry on. Run as `python -m qnix.runtime.waylandproxy`, as the user who owns the
compositor's socket: started as root it binds its socket, reads the protocol files and then
drops to `--user` for good. The keeper starts it beside the compartment.

`--control PATH`: a socket only root can connect to (bound as root, mode 0600), through which
`qnix clip` reads the compartment's selection and grants it one paste (qnix.broker.clipboard):

  copy                         -> `ok MIME` and a pipe's read end (SCM_RIGHTS) the owning
                                  client writes its selection into, or `error WHY`
  paste SIZE MIME [MIME...]    then SIZE bytes -> `ok`: the compartment's clients are offered
                                  them as their selection, for one receive
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from qnix.errors import QnixError
from qnix.wayland import protocol, rules
from qnix.wayland.rules import Chunk, Grant, Output, Rules, Session, Shared, clip_type

READ_SIZE = 16384
# libwayland sends at most 28 descriptors with one sendmsg; a client's queue of descriptors
# not yet matched to a message, and of bytes the other side has not read, is bounded so a
# flood ends that client rather than filling the proxy.
MAX_FDS_PER_READ = 28
MAX_QUEUED_FDS = 256
MAX_QUEUED_BYTES = 4 * 1024 * 1024
MAX_CLIENTS = 128
# The filter's socket: in a root-owned folder of the compartment's run folder, bound read-only
# at /run/user/1000/wayland-0 inside (never the compositor's runtime folder, which also holds
# its IPC socket).
FOLDER_NAME = "wayland"
SOCKET_NAME = "wayland-0"
# `qnix clip`'s way in (root's only), beside the filter's socket in the same root folder.
CONTROL_NAME = "control"
CONTROL_TIMEOUT = 5.0
MAX_GRANT_BYTES = 16 * 1024 * 1024
MAX_CONTROL_LINE = 4096
# How long a granted paste may take to be read by the client that asked for it.
DELIVER_TIMEOUT = 30.0


def control_socket(run_dir: Path) -> Path:
    """Where `qnix clip` reaches the filter of the compartment whose run folder is `run_dir`."""
    return run_dir / FOLDER_NAME / CONTROL_NAME


def start(
    run_dir: Path, upstream: str, compartment: str, *, fullscreen: bool, host_gid: int
) -> subprocess.Popen[bytes]:
    """The filter of one compartment, as the user who owns the compositor's socket; its socket
    is connectable by `host_gid` (the compartment's host group) only. It ends when it is told
    to (SIGTERM) or when its stdin, a pipe from the caller, closes (the caller is gone)."""
    owner = os.stat(upstream)
    if owner.st_uid == 0:
        raise QnixError(
            f"the compositor's socket {upstream} belongs to root: the Wayland filter would parse"
            " a compartment's bytes as root",
            hint="run the compositor as your own user, not root",
        )
    folder = run_dir / FOLDER_NAME
    folder.mkdir(mode=0o755)
    argv = [
        sys.executable,
        "-I",
        "-m",
        "qnix.runtime.waylandproxy",
        "--listen",
        str(folder / SOCKET_NAME),
        "--upstream",
        upstream,
        "--compartment",
        compartment,
        "--user",
        f"{owner.st_uid}:{owner.st_gid}",
        "--socket-group",
        str(host_gid),
        "--control",
        str(control_socket(run_dir)),
        *(["--fullscreen"] if fullscreen else []),
    ]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)


def load_protocols(environ: dict[str, str]) -> protocol.Protocols:
    return protocol.load(protocol.protocol_files(protocol.data_dirs(environ), rules.PROTOCOL_FILES))


class PeerClosed(QnixError):
    """One side closed its connection: the client's session ends, nothing was refused."""


@dataclass(slots=True)
class _Side:
    sock: socket.socket
    # Chunks to send on this socket: bytes, their descriptors (sent with the first byte).
    queue: deque[tuple[memoryview, list[int]]] = field(default_factory=deque)
    queued_bytes: int = 0

    def push(self, chunks: list[Chunk]) -> None:
        for data, fds in chunks:
            self.queue.append((memoryview(data), fds))
            self.queued_bytes += len(data)
        if self.queued_bytes > MAX_QUEUED_BYTES:
            raise QnixError("a Wayland peer does not read what it is sent")

    def flush(self) -> None:
        while self.queue:
            data, fds = self.queue[0]
            try:
                sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            self.queued_bytes -= sent
            if sent == len(data):
                self.queue.popleft()
            else:
                self.queue[0] = (data[sent:], [])

    def close(self) -> None:
        for _, fds in self.queue:
            for fd in fds:
                os.close(fd)
        self.queue.clear()
        self.sock.close()


class _Client:
    def __init__(self, client: socket.socket, server: socket.socket, session: Session) -> None:
        self.client = _Side(client)
        self.server = _Side(server)
        self.session = session

    def close(self) -> None:
        for fd in self.session.queued_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.client.close()
        self.server.close()


def _deliver(fd: int, data: bytes) -> None:
    """A granted paste written into the descriptor the client gave (in a thread of its own:
    a client that does not read holds up only this), then closed; given up after
    DELIVER_TIMEOUT."""
    deadline = time.monotonic() + DELIVER_TIMEOUT
    view = memoryview(data)
    try:
        os.set_blocking(fd, False)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                return
            try:
                view = view[os.write(fd, view[:65536]) :]
            except BlockingIOError:
                continue
    except OSError:
        return
    finally:
        os.close(fd)


def _read_control_request(conn: socket.socket) -> tuple[list[str], bytes]:
    """One request line (words) and, for a paste, its data."""
    buffer = b""
    while b"\n" not in buffer:
        chunk = conn.recv(MAX_CONTROL_LINE)
        if not chunk or len(buffer) > MAX_CONTROL_LINE:
            raise QnixError("a malformed control request")
        buffer += chunk
    line, _, data = buffer.partition(b"\n")
    words = line.decode("utf-8", errors="strict").split(" ")
    if words[0] != "paste":
        return words, b""
    if len(words) < 3 or not words[1].isdigit() or int(words[1]) > MAX_GRANT_BYTES:
        raise QnixError("a malformed paste request")
    size = int(words[1])
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise QnixError("the paste's data ended early")
        data += chunk
    if len(data) != size:
        raise QnixError("more data than the paste announced")
    return words, data


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, READ_SIZE, MAX_FDS_PER_READ)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise QnixError("more descriptors in one message than libwayland ever sends")
    return data, fds


class Proxy:
    def __init__(
        self,
        listener: socket.socket,
        upstream: str,
        rules_: Rules,
        protocols: protocol.Protocols,
        control: socket.socket | None = None,
    ) -> None:
        self.listener = listener
        self.upstream = upstream
        self.rules = rules_
        self.protocols = protocols
        self.shared = Shared()
        self.selector = selectors.DefaultSelector()
        self.clients: dict[socket.socket, _Client] = {}
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)
        self.control = control
        if control is not None:
            control.setblocking(False)
            self.selector.register(control, selectors.EVENT_READ)
        # stdin a pipe from the keeper: when it closes, the keeper is gone, and so is the filter.
        self.parent: int | None = None
        if stat.S_ISFIFO(os.fstat(0).st_mode):
            self.parent = 0
            self.selector.register(0, selectors.EVENT_READ)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.clients) // 2 >= MAX_CLIENTS:
            client.close()
            return
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            server.connect(self.upstream)
        except OSError:
            server.close()
            client.close()
            return
        client.setblocking(False)
        server.setblocking(False)
        pair = _Client(client, server, Session(self.protocols, self.rules, self.shared))
        for sock in (client, server):
            self.clients[sock] = pair
            self.selector.register(sock, selectors.EVENT_READ)

    def _pass_last_words(self, pair: _Client) -> None:
        """What the compositor sent before it closed (a wl_display.error saying why) still
        reaches the client; best effort, the connection ends either way."""
        with contextlib.suppress(Exception):
            while True:
                data, fds = _receive(pair.server.sock)
                if not data:
                    break
                out = pair.session.from_server(data, fds)
                pair.client.push(out.to_client)
            pair.client.flush()

    def _end(self, pair: _Client) -> None:
        pair.session.close()
        self._pass_last_words(pair)
        for side in (pair.client, pair.server):
            if self.clients.pop(side.sock, None) is not None:
                self.selector.unregister(side.sock)
        pair.close()

    def _watch_writes(self, side: _Side) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if side.queue else 0)
        self.selector.modify(side.sock, events)

    def _readable(self, pair: _Client, sock: socket.socket) -> None:
        from_client = sock is pair.client.sock
        data, fds = _receive(sock)
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerClosed("the peer closed the connection")
        feed = pair.session.from_client if from_client else pair.session.from_server
        out: Output = feed(data, fds)
        for fd in out.discard:
            os.close(fd)
        if len(pair.session.queued_fds()) > MAX_QUEUED_FDS:
            raise QnixError("descriptors without messages")
        pair.server.push(out.to_server)
        pair.client.push(out.to_client)
        for fd, data in out.deliver:
            threading.Thread(target=_deliver, args=(fd, data), daemon=True).start()
        if out.deliver:
            self._refresh_selections()  # the grant is gone: show what the compositor holds

    def _pairs(self) -> list[_Client]:
        return list({id(pair): pair for pair in self.clients.values()}.values())

    def _send(self, pair: _Client, out: Output) -> None:
        """What the filter itself sends on a client's connections (not in answer to it)."""
        try:
            pair.server.push(out.to_server)
            pair.client.push(out.to_client)
            for side in (pair.client, pair.server):
                side.flush()
                self._watch_writes(side)
        except Exception as exc:
            print(f"client ended: {exc}", file=sys.stderr, flush=True)
            self._end(pair)

    def _refresh_selections(self) -> None:
        for pair in self._pairs():
            if pair.client.sock in self.clients:
                self._send(pair, pair.session.refresh_selection())

    def _copy(self, conn: socket.socket) -> None:
        """The compartment's selection: the owning client is asked to write it into a pipe
        whose read end goes to the caller."""
        owner = self.shared.owner
        pair = next((p for p in self._pairs() if owner and p.session is owner[0]), None)
        if owner is None or pair is None:
            conn.sendall(b"error the compartment has no selection\n")
            return
        session, source = owner
        mime = clip_type(session.sources.get(source, []))
        if mime is None:
            conn.sendall(b"error its selection offers no type\n")
            return
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            socket.send_fds(conn, [f"ok {mime}\n".encode()], [reader])
        finally:
            os.close(reader)
        out = Output(to_client=[session.ask_source(source, mime, writer)])
        self._send(pair, out)  # the write end is closed once sent

    def _paste(self, words: list[str], data: bytes, conn: socket.socket) -> None:
        """A grant of one paste to the compartment's clients, shown to them at once."""
        types = tuple(words[2:])
        if not all(0 < len(t) <= 255 and t.isprintable() and " " not in t for t in types):
            raise QnixError("a malformed type in a paste request")
        self.shared.grant = Grant(types, data)
        self._refresh_selections()
        conn.sendall(b"ok\n")

    def _control(self) -> None:
        """One request of `qnix clip` (root), answered at once; any error refuses it."""
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(CONTROL_TIMEOUT)
            try:
                words, data = _read_control_request(conn)
                if words == ["copy"]:
                    self._copy(conn)
                elif words[0] == "paste":
                    self._paste(words, data, conn)
                else:
                    raise QnixError("an unknown control request")
            except (QnixError, OSError, UnicodeDecodeError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(f"error {exc}\n".encode())

    def step(self, timeout: float | None = None) -> None:
        for key, events in self.selector.select(timeout):
            sock = key.fileobj
            if sock == self.parent:
                if not os.read(0, 4096):
                    raise SystemExit(0)
                continue
            if sock is self.listener:
                self._accept()
                continue
            if sock is self.control:
                self._control()
                continue
            assert isinstance(sock, socket.socket)
            pair = self.clients.get(sock)
            if pair is None:
                continue  # ended earlier in this round
            try:
                if events & selectors.EVENT_READ:
                    self._readable(pair, sock)
                for side in (pair.client, pair.server):
                    side.flush()
                    self._watch_writes(side)
            except Exception as exc:
                # Malformed, refused, gone, or a bug in the rules: this client and its
                # compositor connection end, never the filter and its other clients.
                if not isinstance(exc, PeerClosed | ConnectionResetError | BrokenPipeError):
                    print(f"client ended: {exc}", file=sys.stderr, flush=True)
                self._end(pair)

    def serve_forever(self) -> None:
        while True:
            self.step()


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid` for good: the bytes of a compartment are parsed without root."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnix.runtime.waylandproxy")
    parser.add_argument(
        "--listen", required=True, help="the socket the compartment connects to (a new path)"
    )
    parser.add_argument("--upstream", required=True, help="the compositor's socket")
    parser.add_argument("--compartment", required=True)
    parser.add_argument("--fullscreen", action="store_true")
    parser.add_argument(
        "--socket-group", type=int, required=True, help="the group that may connect"
    )
    parser.add_argument(
        "--user", metavar="UID:GID", help="drop to this user once listening (the compositor's)"
    )
    parser.add_argument("--control", help="a socket for `qnix clip` (a new path; root's only)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    protocols = load_protocols(dict(os.environ))
    marker = rules.MARKER_PREFIX + secrets.token_hex(16)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(args.listen)
    os.chown(args.listen, -1, args.socket_group)
    os.chmod(args.listen, 0o660)
    listener.listen(16)
    control = None
    if args.control:
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        previous = os.umask(0o177)  # 0600 from the start: no moment in which others connect
        try:
            control.bind(args.control)
        finally:
            os.umask(previous)
        control.listen(4)
    if args.user:
        uid, gid = (int(part) for part in args.user.split(":"))
        drop_privileges(uid, gid)
    print("ready", flush=True)
    Proxy(
        listener,
        args.upstream,
        Rules(args.compartment, args.fullscreen, marker),
        protocols,
        control,
    ).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
