"""The Wayland wire format: messages decoded against their signatures, encoded back, and the
objects of one connection, so every message on it can be decoded.

A message is a header of two 32-bit words in the host's byte order — the object id, then
size << 16 | opcode — and its arguments, each padded to 32 bits; file descriptors travel
beside the bytes (SCM_RIGHTS) in the order the arguments name them. Anything that does not
fit its signature raises WireError: the filter ends that client, nothing else.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from qnix.errors import QnixError
from qnix.wayland.protocol import Arg, Interface, Message, Protocols

HEADER = struct.Struct("=II")
WORD = struct.Struct("=I")
SIGNED = struct.Struct("=i")
# libwayland's connection buffer: no message is longer, and the size field is 16 bits anyway.
MAX_MESSAGE_SIZE = 4096
# Ids the server allocates (new_id in events) start here; clients allocate below it.
SERVER_ID_START = 0xFF000000
DISPLAY_ID = 1
# Objects one connection may hold at once (live or not yet freed): far above what a browser
# needs, far below what would let one client fill the filter's memory.
MAX_OBJECTS = 1 << 17


class WireError(QnixError):
    """A message that does not fit the protocol: the connection it came on is ended."""


@dataclass(frozen=True, slots=True)
class UntypedNewId:
    """wl_registry.bind's new_id: interface name and version travel with the id."""

    interface: str
    version: int
    id: int


@dataclass(frozen=True, slots=True)
class Fd:
    """A file descriptor argument, already taken from the connection's queue."""

    fd: int


Value = int | str | bytes | None | UntypedNewId | Fd


@dataclass(frozen=True, slots=True)
class Decoded:
    object_id: int
    opcode: int
    interface: Interface
    version: int
    message: Message
    args: tuple[Value, ...]
    raw: bytes

    def arg(self, name: str) -> Value:
        for arg, value in zip(self.message.args, self.args, strict=True):
            if arg.name == name:
                return value
        raise KeyError(name)

    def fds(self) -> list[int]:
        return [value.fd for value in self.args if isinstance(value, Fd)]


def message_size(buffer: bytes | bytearray) -> int | None:
    """The size of the message at the start of `buffer`, or None while its header is partial."""
    if len(buffer) < HEADER.size:
        return None
    _, word = HEADER.unpack_from(buffer)
    size = int(word) >> 16
    if size < HEADER.size or size % 4 or size > MAX_MESSAGE_SIZE:
        raise WireError(f"a message of {size} bytes")
    return size


class _Reader:
    def __init__(self, body: bytes, fds: deque[int]) -> None:
        self.body = body
        self.offset = 0
        self.fds = fds

    def word(self) -> int:
        if self.offset + 4 > len(self.body):
            raise WireError("a message shorter than its arguments")
        (value,) = WORD.unpack_from(self.body, self.offset)
        self.offset += 4
        return int(value)

    def blob(self) -> bytes:
        length = self.word()
        padded = (length + 3) & ~3
        if self.offset + padded > len(self.body):
            raise WireError("an array or string longer than its message")
        data = self.body[self.offset : self.offset + length]
        self.offset += padded
        return data

    def string(self, allow_null: bool) -> str | None:
        data = self.blob()
        if not data:
            if allow_null:
                return None
            raise WireError("a null string where one is required")
        if data[-1] != 0 or 0 in data[:-1]:
            raise WireError("a string not ended by its only NUL")
        try:
            return data[:-1].decode()
        except UnicodeDecodeError as exc:
            raise WireError("a string that is not UTF-8") from exc

    def fd(self) -> Fd:
        if not self.fds:
            raise WireError("a file descriptor argument without a descriptor")
        return Fd(self.fds.popleft())


def _value(reader: _Reader, arg: Arg) -> Value:
    kind = arg.type
    if kind in ("uint", "object"):
        value = reader.word()
        if kind == "object" and value == 0 and not arg.allow_null:
            raise WireError(f"a null object for {arg.name}")
        return value
    if kind in ("int", "fixed"):
        (signed,) = SIGNED.unpack(WORD.pack(reader.word()))
        return int(signed)
    if kind == "string":
        return reader.string(arg.allow_null)
    if kind == "array":
        return reader.blob()
    if kind == "fd":
        return reader.fd()
    # new_id
    if arg.interface is None:
        interface = reader.string(allow_null=False)
        version = reader.word()
        assert interface is not None
        return UntypedNewId(interface, version, reader.word())
    return reader.word()


def decode_args(message: Message, body: bytes, fds: deque[int]) -> tuple[Value, ...]:
    """The arguments of `message` from `body` (the bytes after the header), taking its
    descriptors from `fds`; every byte must belong to an argument."""
    reader = _Reader(body, fds)
    values = tuple(_value(reader, arg) for arg in message.args)
    if reader.offset != len(body):
        raise WireError(f"{len(body) - reader.offset} bytes after the arguments of {message.name}")
    return values


def _blob(data: bytes) -> bytes:
    return WORD.pack(len(data)) + data + b"\0" * (-len(data) % 4)


def _string(value: str | None) -> bytes:
    return WORD.pack(0) if value is None else _blob(value.encode() + b"\0")


def encode(
    object_id: int, opcode: int, message: Message, args: tuple[Value, ...]
) -> tuple[bytes, list[int]]:
    """The bytes of one message and the descriptors that go with it."""
    parts: list[bytes] = []
    fds: list[int] = []
    for arg, value in zip(message.args, args, strict=True):
        if isinstance(value, Fd):
            fds.append(value.fd)
        elif isinstance(value, UntypedNewId):
            parts += [_string(value.interface), WORD.pack(value.version), WORD.pack(value.id)]
        elif arg.type == "string":
            assert value is None or isinstance(value, str)
            parts.append(_string(value))
        elif isinstance(value, bytes):
            parts.append(_blob(value))
        elif isinstance(value, int):
            parts.append(SIGNED.pack(value) if arg.type in ("int", "fixed") else WORD.pack(value))
        else:
            raise WireError(f"cannot encode {value!r} as {arg.type}")
    body = b"".join(parts)
    size = HEADER.size + len(body)
    if size > MAX_MESSAGE_SIZE:
        raise WireError(f"a message of {size} bytes")
    return HEADER.pack(object_id, size << 16 | opcode) + body, fds


@dataclass(slots=True)
class Entry:
    interface: Interface
    version: int
    live: bool = True


class Objects:
    """One connection's objects: id -> interface and version. A destroyed object stays as a
    zombie until its id is freed (wl_display.delete_id, or a new server object in its place),
    because events sent before the compositor saw the destroy still arrive for it."""

    def __init__(self, protocols: Protocols) -> None:
        self.protocols = protocols
        self.entries: dict[int, Entry] = {DISPLAY_ID: Entry(protocols["wl_display"], 1)}

    def get(self, object_id: int) -> Entry:
        entry = self.entries.get(object_id)
        if entry is None:
            raise WireError(f"a message for object {object_id}, which does not exist")
        return entry

    def live(self, object_id: int, interface: str | None) -> Entry:
        entry = self.get(object_id)
        if not entry.live:
            raise WireError(f"a message for object {object_id}, which was destroyed")
        if interface is not None and entry.interface.name != interface:
            raise WireError(f"object {object_id} is a {entry.interface.name}, not a {interface}")
        return entry

    def create(self, object_id: int, interface: str, version: int, *, by_server: bool) -> None:
        """A new object; it has its parent's version (a bound global: the version asked for)."""
        if by_server != (object_id >= SERVER_ID_START) or object_id == 0:
            raise WireError(f"new object id {object_id} outside its side's range")
        known = self.entries.get(object_id)
        if known is not None and (known.live or not by_server):
            raise WireError(f"new object id {object_id} is in use")
        if known is None and len(self.entries) >= MAX_OBJECTS:
            raise WireError(f"more than {MAX_OBJECTS} objects")
        found = self.protocols.get(interface)
        if found is None:
            raise WireError(f"an object of the unknown interface {interface}")
        self.entries[object_id] = Entry(found, version)

    def destroy(self, object_id: int) -> None:
        self.get(object_id).live = False

    def forget(self, object_id: int) -> None:
        """wl_display.delete_id: the id may be used again."""
        self.entries.pop(object_id, None)


def take_message(
    objects: Objects, buffer: bytearray, fds: deque[int], *, request: bool
) -> Decoded | None:
    """The next whole message at the start of `buffer` (removed from it), decoded as a
    request or an event of its object; None while it is incomplete."""
    size = message_size(buffer)
    if size is None or len(buffer) < size:
        return None
    object_id, word = HEADER.unpack_from(buffer)
    raw = bytes(buffer[:size])
    del buffer[:size]
    entry = objects.live(object_id, None) if request else objects.get(object_id)
    opcode = word & 0xFFFF
    messages = entry.interface.requests if request else entry.interface.events
    if opcode >= len(messages):
        raise WireError(f"{entry.interface.name} has no message {opcode}")
    message = messages[opcode]
    if message.since > entry.version:
        raise WireError(f"{entry.interface.name}.{message.name} is newer than the object")
    args = decode_args(message, raw[HEADER.size :], fds)
    return Decoded(object_id, opcode, entry.interface, entry.version, message, args, raw)
