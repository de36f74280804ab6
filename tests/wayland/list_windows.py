"""Lists the compositor's windows through wlr-foreign-toplevel, on the standard library alone:
an attack made from a VM guest, whose python3 is the host's but which has none of qnix's
modules (tests/wayland/client.py needs qnix's codec). Run as
`python3 -I list_windows.py [NAME]`, or its text with `-c`.

It reads the registry of WAYLAND_DISPLAY and prints `shown NAME` when
zwlr_foreign_toplevel_manager_v1 is among the globals, else `not shown`; then it binds the
manager by that name, or by NAME when it was not shown (a guess: the raw socket's), and prints
`title TITLE` for every window the compositor tells of, then `done`. A display that ends the
connection instead makes it print `closed` (exit status 3); a protocol error, `error ...`,
and a minute without an answer, `timed out` (exit status 4).
"""

import os
import socket
import struct
import sys
from collections.abc import Iterator

MANAGER = "zwlr_foreign_toplevel_manager_v1"


class Ended(Exception):
    pass


def main() -> int:
    display = os.environ["WAYLAND_DISPLAY"]
    if not display.startswith("/"):
        display = os.path.join(os.environ["XDG_RUNTIME_DIR"], display)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(display)
    sock.settimeout(60)
    buffered = b""

    def send(obj: int, opcode: int, *args: int | str) -> None:
        body = b""
        for arg in args:
            if isinstance(arg, str):
                raw = arg.encode() + b"\0"
                body += struct.pack("=I", len(raw)) + raw + b"\0" * (-len(raw) % 4)
            else:
                body += struct.pack("=I", arg & 0xFFFFFFFF)
        sock.sendall(struct.pack("=II", obj, (8 + len(body)) << 16 | opcode) + body)

    def string(body: bytes, at: int = 0) -> str:
        (length,) = struct.unpack_from("=I", body, at)
        return body[at + 4 : at + 4 + length - 1].decode(errors="replace")

    def until(callback: int) -> Iterator[tuple[int, int, bytes]]:
        """The events up to the done of `callback` (a wl_display.sync's)."""
        nonlocal buffered
        while True:
            while len(buffered) >= 8:
                obj, word = struct.unpack_from("=II", buffered)
                size = word >> 16
                if size < 8 or len(buffered) < size:
                    break
                body, buffered = buffered[8:size], buffered[size:]
                if obj == 1 and word & 0xFFFF == 0:
                    raise Ended(f"error {string(body, 8)}")
                if obj == callback:
                    return
                yield obj, word & 0xFFFF, body
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise Ended("timed out") from None
            if not chunk:
                raise Ended("closed")
            buffered += chunk

    send(1, 1, 2)  # wl_display.get_registry
    send(1, 0, 3)  # wl_display.sync
    names = {}
    for obj, opcode, body in until(3):
        if obj == 2 and opcode == 0:  # wl_registry.global
            (name,) = struct.unpack_from("=I", body)
            names[string(body, 4)] = name
    if MANAGER in names:
        name = names[MANAGER]
        print(f"shown {name}", flush=True)
    else:
        print("not shown", flush=True)
        if len(sys.argv) < 2:
            return 0
        name = int(sys.argv[1])
    send(2, 0, name, MANAGER, 1, 4)  # wl_registry.bind, version 1, as object 4
    send(1, 0, 5)  # wl_display.sync: its done comes after the windows the bind told of
    handles = set()
    for obj, opcode, body in until(5):
        if obj == 4 and opcode == 0:  # the manager's toplevel: a handle
            handles.add(struct.unpack_from("=I", body)[0])
        elif obj in handles and opcode == 0:  # the handle's title
            print(f"title {string(body)}", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Ended as ended:
        print(ended, flush=True)
        sys.exit(3 if str(ended) == "closed" else 4)
