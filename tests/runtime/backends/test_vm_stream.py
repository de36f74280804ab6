"""A GUI VM's streams through the relay, with a real socket pair as the port and a real unix
socket standing where the host's waypipe client listens: bytes both ways under the window, the
end of each direction, and what a hostile guest's frames do (end the relay), each with its
control."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qnix.runtime import vmlink
from qnix.runtime.backends.vm_relay import Relay

FIRST = vmlink.STREAM_CHANNELS
TIMEOUT = 10.0


@dataclass
class Guest:
    """The guest's end of the port, as the test speaks it, and the relay's dispatch result."""

    link: vmlink.Link
    port: socket.socket
    relay: Relay
    dispatching: threading.Thread
    ended: list[BaseException]

    def send(self, channel: int, kind: int, payload: bytes = b"") -> None:
        self.link.send(channel, kind, payload)

    def receive(self) -> tuple[int, int, bytes]:
        return self.link.receive()

    def receive_data(self, channel: int, *, grant: bool) -> bytes:
        """STREAM_DATA of `channel` until none comes for half a second; with `grant`, each
        chunk granted back as it comes (as the guest's agent does once it wrote it out)."""
        data = b""
        while select.select([self.port], [], [], 0.5)[0]:
            got, kind, payload = self.receive()
            assert (got, kind) == (channel, vmlink.STREAM_DATA), (got, kind, payload)
            data += payload
            if grant:
                self.send(channel, vmlink.CREDIT, len(payload).to_bytes(4, "big"))
        return data

    def relay_ended(self) -> BaseException | None:
        self.dispatching.join(TIMEOUT)
        assert not self.dispatching.is_alive()
        return self.ended[0] if self.ended else None


def start_relay(gui_socket: str | None) -> Guest:
    guest_end, relay_end = socket.socketpair()
    guest_end.settimeout(TIMEOUT)
    relay_link = vmlink.Link(socket.SocketIO(relay_end, "r"), socket.SocketIO(relay_end, "w"))
    guest_link = vmlink.Link(socket.SocketIO(guest_end, "r"), socket.SocketIO(guest_end, "w"))
    relay = Relay(relay_link, "/nonexistent/call.sock", gui_socket)
    ended: list[BaseException] = []

    def dispatch() -> None:
        try:
            relay.dispatch()
        except vmlink.LinkError as exc:
            ended.append(exc)
        finally:
            relay_end.close()

    dispatching = threading.Thread(target=dispatch, daemon=True)
    dispatching.start()
    return Guest(guest_link, guest_end, relay, dispatching, ended)


@pytest.fixture
def waypipe_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """Where the host's waypipe client would listen."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "client"))
    server.listen(8)
    server.settimeout(TIMEOUT)
    yield server
    server.close()


def address(server: socket.socket) -> str:
    return str(server.getsockname())


def test_a_stream_carries_bytes_both_ways_and_ends_with_both_sides(
    waypipe_socket: socket.socket,
) -> None:
    guest = start_relay(address(waypipe_socket))
    guest.send(FIRST, vmlink.STREAM_OPEN)
    guest.send(FIRST, vmlink.STREAM_DATA, b"hello from the guest")
    conn, _ = waypipe_socket.accept()
    conn.settimeout(TIMEOUT)
    received = b""
    while len(received) < 20:
        received += conn.recv(100)
    assert received == b"hello from the guest"
    # What the host's side wrote out is granted back to the guest.
    assert guest.receive() == (FIRST, vmlink.CREDIT, (20).to_bytes(4, "big"))

    # More than a window from the host's side: the relay sends at most a window, then waits
    # for the guest's credit before it sends more.
    big = bytes(range(256)) * (vmlink.WINDOW // 256 + 100)
    sender = threading.Thread(target=conn.sendall, args=(big,), daemon=True)
    sender.start()
    first = guest.receive_data(FIRST, grant=False)
    assert vmlink.WINDOW - vmlink.MAX_PAYLOAD < len(first) <= vmlink.WINDOW
    guest.send(FIRST, vmlink.CREDIT, len(first).to_bytes(4, "big"))
    rest = guest.receive_data(FIRST, grant=True)
    assert first + rest == big
    sender.join(TIMEOUT)

    # The guest's side ends: the host's connection reads its end; then the host's side
    # closes, and the guest hears the stream's end.
    guest.send(FIRST, vmlink.STREAM_END)
    assert conn.recv(100) == b""
    conn.close()
    assert guest.receive() == (FIRST, vmlink.STREAM_END, b"")
    deadline = time.monotonic() + TIMEOUT
    while guest.relay.streams and time.monotonic() < deadline:  # both its threads are done
        time.sleep(0.01)
    assert not guest.relay.streams
    guest.port.close()
    assert isinstance(guest.relay_ended(), vmlink.LinkError)  # the port's end, nothing else


def test_a_stream_without_a_display_ends_at_once_and_its_data_is_dropped() -> None:
    guest = start_relay(None)
    guest.send(FIRST, vmlink.STREAM_OPEN)
    guest.send(FIRST, vmlink.STREAM_DATA, b"x" * 100)
    frames = {guest.receive(), guest.receive()}
    assert frames == {
        (FIRST, vmlink.STREAM_END, b""),
        (FIRST, vmlink.CREDIT, (100).to_bytes(4, "big")),
    }
    guest.send(FIRST, vmlink.STREAM_END)
    guest.port.close()
    guest.relay_ended()


def test_streams_beyond_the_limit_end_at_once(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "client"))
    server.listen(vmlink.MAX_STREAMS + 8)
    try:
        guest = start_relay(str(tmp_path / "client"))
        for number in range(vmlink.MAX_STREAMS):
            guest.send(FIRST + number, vmlink.STREAM_OPEN)
        beyond = FIRST + vmlink.MAX_STREAMS
        guest.send(beyond, vmlink.STREAM_OPEN)
        assert guest.receive() == (beyond, vmlink.STREAM_END, b"")
        assert len(guest.relay.streams) == vmlink.MAX_STREAMS
        assert beyond not in guest.relay.streams
        guest.port.close()
        guest.relay_ended()
    finally:
        server.close()


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        # The control: a stream in the guest's range opens, the relay goes on.
        ([(FIRST, vmlink.STREAM_OPEN, b"")], None),
        ([(1, vmlink.STREAM_OPEN, b"")], "a stream opened on channel 1"),
        ([(vmlink.CALL_CHANNELS, vmlink.STREAM_OPEN, b"")], "a stream opened on channel"),
        ([(FIRST, vmlink.STREAM_OPEN, b"")] * 2, "opened twice"),
        (
            [(FIRST, vmlink.STREAM_OPEN, b"")]
            + [(FIRST, vmlink.STREAM_DATA, b"d" * vmlink.MAX_PAYLOAD)] * 40,
            "beyond its window",
        ),
    ],
)
def test_a_malformed_stream_frame_ends_the_relay(
    tmp_path: Path, frames: list[tuple[int, int, bytes]], why: str | None
) -> None:
    # A display that never reads: what the guest sends fills the socket's buffer, then the
    # relay's window.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "client"))
    server.listen(8)
    try:
        guest = start_relay(str(tmp_path / "client"))
        with contextlib.suppress(OSError):  # the relay may have closed the port already
            for frame in frames:
                guest.send(*frame)
        if why is None:
            guest.dispatching.join(0.5)
            assert guest.dispatching.is_alive()
            guest.port.close()
            assert "closed the port" in str(guest.relay_ended())
            return
        assert why in str(guest.relay_ended())
    finally:
        server.close()
