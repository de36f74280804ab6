"""A small Wayland client on qnix's own codec, for attacks the stock tools do not make (a bind
by a guessed global name, listing other windows) and for bytes no library would send.

The wlroots protocols it uses are not in wayland-protocols; their signatures, as version 1
defines them, are written out here (the attacker brings its own)."""

from __future__ import annotations

import mmap
import os
import select
import socket
import time
from collections import deque
from pathlib import Path

from qnix.wayland.protocol import Arg, Interface, Message, Protocols
from qnix.wayland.wire import Decoded, Fd, Objects, UntypedNewId, Value, encode, take_message


def _m(name: str, *args: Arg, destructor: bool = False) -> Message:
    return Message(name, args, destructor=destructor)


U = "uint"
WLR = {
    "zwlr_screencopy_manager_v1": Interface(
        "zwlr_screencopy_manager_v1",
        1,
        (
            _m(
                "capture_output",
                Arg("frame", "new_id", "zwlr_screencopy_frame_v1"),
                Arg("overlay_cursor", "int"),
                Arg("output", "object", "wl_output"),
            ),
        ),
        (),
    ),
    "zwlr_screencopy_frame_v1": Interface(
        "zwlr_screencopy_frame_v1",
        1,
        (_m("copy", Arg("buffer", "object", "wl_buffer")), _m("destroy", destructor=True)),
        (
            _m("buffer", Arg("format", U), Arg("width", U), Arg("height", U), Arg("stride", U)),
            _m("flags", Arg("flags", U)),
            _m("ready", Arg("tv_sec_hi", U), Arg("tv_sec_lo", U), Arg("tv_nsec", U)),
            _m("failed"),
        ),
    ),
    "zwlr_foreign_toplevel_manager_v1": Interface(
        "zwlr_foreign_toplevel_manager_v1",
        1,
        (_m("stop"),),
        (
            _m("toplevel", Arg("toplevel", "new_id", "zwlr_foreign_toplevel_handle_v1")),
            _m("finished"),
        ),
    ),
    "zwlr_foreign_toplevel_handle_v1": Interface(
        "zwlr_foreign_toplevel_handle_v1",
        1,
        (),
        (
            _m("title", Arg("title", "string")),
            _m("app_id", Arg("app_id", "string")),
            _m("output_enter", Arg("output", "object", "wl_output")),
            _m("output_leave", Arg("output", "object", "wl_output")),
            _m("state", Arg("state", "array")),
            _m("done"),
            _m("closed"),
        ),
    ),
}


class Disconnected(Exception):
    """The other end closed the connection."""


class Client:
    def __init__(self, display: Path, protocols: Protocols) -> None:
        self.protocols = {**protocols, **WLR}
        self.objects = Objects(self.protocols)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(display))
        self.next_id = 2
        self.buffer = bytearray()
        self.fds: deque[int] = deque()
        self.registry = self.new("wl_registry")
        self.send(1, "wl_display", "get_registry", self.registry)

    def new(self, interface: str, version: int = 1) -> int:
        object_id = self.next_id
        self.next_id += 1
        self.objects.create(object_id, interface, version, by_server=False)
        return object_id

    def send(self, object_id: int, interface: str, name: str, *args: Value) -> None:
        found = self.protocols[interface]
        opcode = found.request(name)
        data, fds = encode(object_id, opcode, found.requests[opcode], args)
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        try:
            socket.send_fds(self.sock, [data], fds or [])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Disconnected from exc

    def bind(self, name: int, interface: str, version: int = 1) -> int:
        object_id = self.new(interface, version)
        self.send(
            self.registry, "wl_registry", "bind", name, UntypedNewId(interface, version, object_id)
        )
        return object_id

    def events(self, timeout: float = 5.0) -> list[Decoded]:
        """What arrived within `timeout` (at least one read)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return []
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 64)
        except ConnectionResetError as exc:
            raise Disconnected from exc
        if not data:
            raise Disconnected
        self.buffer += data
        self.fds.extend(fds)
        decoded = []
        while (
            event := take_message(self.objects, self.buffer, self.fds, request=False)
        ) is not None:
            for arg, value in zip(event.message.args, event.args, strict=True):
                if arg.type == "new_id" and isinstance(value, int) and arg.interface:
                    self.objects.create(value, arg.interface, event.version, by_server=True)
            if event.interface.name == "wl_display" and event.message.name == "error":
                raise Disconnected(f"protocol error: {event.args}")
            decoded.append(event)
        return decoded

    def roundtrip(self, timeout: float = 5.0) -> list[Decoded]:
        """Everything the compositor sent until it answered a sync."""
        callback = self.new("wl_callback")
        self.send(1, "wl_display", "sync", callback)
        seen: list[Decoded] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(deadline - time.monotonic()):
                seen.append(event)
                if event.object_id == callback:
                    return seen
        raise AssertionError("no answer to wl_display.sync")

    def globals(self) -> dict[str, tuple[int, int]]:
        """interface -> (name, version), as the registry lists them to this client."""
        return {
            str(e.args[1]): (int(str(e.args[0])), int(str(e.args[2])))
            for e in self.roundtrip()
            if e.object_id == self.registry and e.message.name == "global"
        }

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


def capture(client: Client, names: dict[str, int]) -> bytes:
    """The first output's pixels (4 bytes each, B G R X) through wlr-screencopy, its manager
    bound by the name in `names`, without waiting for the registry."""
    shm = client.bind(names["wl_shm"], "wl_shm")
    output = client.bind(names["wl_output"], "wl_output")
    manager = client.bind(names["zwlr_screencopy_manager_v1"], "zwlr_screencopy_manager_v1")
    frame = client.new("zwlr_screencopy_frame_v1")
    client.send(manager, "zwlr_screencopy_manager_v1", "capture_output", frame, 0, output)
    size = next(
        e.args for e in client.roundtrip() if e.object_id == frame and e.message.name == "buffer"
    )
    pixel_format, width, height, stride = (int(str(v)) for v in size)
    memfd = os.memfd_create("capture")
    os.ftruncate(memfd, stride * height)
    pool, buffer = client.new("wl_shm_pool"), client.new("wl_buffer")
    client.send(shm, "wl_shm", "create_pool", pool, Fd(memfd), stride * height)
    client.send(
        pool, "wl_shm_pool", "create_buffer", buffer, 0, width, height, stride, pixel_format
    )
    client.send(frame, "zwlr_screencopy_frame_v1", "copy", buffer)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = [e.message.name for e in client.events(1) if e.object_id == frame]
        if "failed" in done:
            raise AssertionError("screencopy failed")
        if "ready" in done:
            with mmap.mmap(memfd, stride * height) as pixels:
                os.close(memfd)
                return bytes(pixels)
    raise AssertionError("screencopy never finished")


def count_colour(pixels: bytes, rgb: tuple[int, int, int], bgrx: bool = True) -> int:
    """How many pixels of `pixels` (B G R X, or R G B when not `bgrx`) have colour `rgb`."""
    r, g, b = rgb
    if bgrx:
        return sum(1 for i in range(0, len(pixels) - 3, 4) if pixels[i : i + 3] == bytes((b, g, r)))
    return sum(1 for i in range(0, len(pixels) - 2, 3) if pixels[i : i + 3] == bytes((r, g, b)))
