"""The codec against the protocol files: exact bytes, and every malformed message refused."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qnix.wayland.protocol import Arg, Protocols
from qnix.wayland.wire import (
    MAX_OBJECTS,
    Fd,
    Objects,
    UntypedNewId,
    WireError,
    decode_args,
    encode,
    take_message,
)


def test_signatures_come_from_the_xml(protocols: Protocols) -> None:
    registry = protocols["wl_registry"]
    assert registry.requests[0].args == (Arg("name", "uint"), Arg("id", "new_id"))
    assert [m.name for m in registry.events] == ["global", "global_remove"]
    create_pool = protocols["wl_shm"].requests[0]
    assert [a.type for a in create_pool.args] == ["new_id", "fd", "int"]
    assert create_pool.args[0].interface == "wl_shm_pool"
    assert (
        protocols["xdg_toplevel"].requests[protocols["xdg_toplevel"].request("destroy")].destructor
    )
    assert protocols["wl_data_device"].events[1].args[-1] == Arg(
        "id", "object", "wl_data_offer", True
    )


def test_bind_encodes_interface_and_version_before_the_id(protocols: Protocols) -> None:
    bind = protocols["wl_registry"].requests[0]
    data, fds = encode(2, 0, bind, (7, UntypedNewId("wl_shm", 1, 5)))
    assert fds == []
    assert data == (
        (2).to_bytes(4, "little")
        + (32 << 16).to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + b"wl_shm\0\0"
        + (1).to_bytes(4, "little")
        + (5).to_bytes(4, "little")
    )
    assert decode_args(bind, data[8:], deque()) == (7, UntypedNewId("wl_shm", 1, 5))


def test_fds_are_taken_in_order(protocols: Protocols) -> None:
    create_pool = protocols["wl_shm"].requests[0]
    data, fds = encode(3, 0, create_pool, (9, Fd(41), 4096))
    assert fds == [41]
    queue = deque([41, 42])
    assert decode_args(create_pool, data[8:], queue) == (9, Fd(41), 4096)
    assert list(queue) == [42]
    with pytest.raises(WireError, match="without a descriptor"):
        decode_args(create_pool, data[8:], deque())


def _message(object_id: int, opcode: int, body: bytes, size: int | None = None) -> bytearray:
    size = 8 + len(body) if size is None else size
    return bytearray(
        object_id.to_bytes(4, "little") + (size << 16 | opcode).to_bytes(4, "little") + body
    )


@pytest.mark.parametrize(
    ("buffer", "error"),
    [
        (_message(1, 0, b"", size=4), "a message of 4 bytes"),
        (_message(1, 0, b"\0" * 6, size=14), "a message of 14 bytes"),
        (_message(1, 0, b"", size=8192), "a message of 8192 bytes"),
        (_message(9, 0, b"\0\0\0\0"), "object 9, which does not exist"),
        (_message(1, 7, b""), "wl_display has no message 7"),
        (_message(1, 0, b""), "shorter than its arguments"),
        (_message(1, 1, b"\2\0\0\0\0\0\0\0"), "4 bytes after the arguments"),
    ],
)
def test_malformed_messages_are_refused(
    protocols: Protocols, buffer: bytearray, error: str
) -> None:
    with pytest.raises(WireError, match=error):
        take_message(Objects(protocols), buffer, deque(), request=True)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\x08\0\0\0wl_shm\0\0", "ended by its only NUL"),  # length counts one byte too many
        (b"\x04\0\0\0ab\0c", "ended by its only NUL"),
        (b"\x03\0\0\0\xff\xfe\0\0", "not UTF-8"),
        (b"\xff\xff\0\0", "longer than its message"),
        (b"\0\0\0\0", "a null string"),
    ],
)
def test_bad_strings_are_refused(protocols: Protocols, body: bytes, error: str) -> None:
    bind = protocols["wl_registry"].requests[0]
    with pytest.raises(WireError, match=error):
        decode_args(bind, b"\1\0\0\0" + body + b"\1\0\0\0\5\0\0\0", deque())


def test_a_partial_message_waits(protocols: Protocols) -> None:
    whole = _message(1, 1, b"\2\0\0\0")
    buffer = bytearray(whole[:10])
    objects = Objects(protocols)
    assert take_message(objects, buffer, deque(), request=True) is None
    buffer += whole[10:]
    decoded = take_message(objects, buffer, deque(), request=True)
    assert decoded is not None
    assert (decoded.message.name, decoded.args, bytes(buffer)) == ("get_registry", (2,), b"")


def test_objects_follow_creation_and_deletion(protocols: Protocols) -> None:
    objects = Objects(protocols)
    objects.create(2, "wl_registry", 1, by_server=False)
    with pytest.raises(WireError, match="in use"):
        objects.create(2, "wl_registry", 1, by_server=False)
    with pytest.raises(WireError, match="outside its side's range"):
        objects.create(0xFF000001, "wl_registry", 1, by_server=False)
    with pytest.raises(WireError, match="unknown interface"):
        objects.create(3, "zwlr_screencopy_manager_v1", 1, by_server=False)
    objects.destroy(2)
    with pytest.raises(WireError, match="was destroyed"):
        objects.live(2, None)
    assert objects.get(2).interface.name == "wl_registry"  # events may still come for it
    objects.forget(2)
    objects.create(2, "wl_callback", 1, by_server=False)
    assert objects.live(2, "wl_callback").version == 1


def test_a_client_cannot_hold_unbounded_objects(protocols: Protocols) -> None:
    objects = Objects(protocols)
    for object_id in range(2, MAX_OBJECTS + 1):
        objects.create(object_id, "wl_callback", 1, by_server=False)
    with pytest.raises(WireError, match=f"more than {MAX_OBJECTS} objects"):
        objects.create(MAX_OBJECTS + 1, "wl_callback", 1, by_server=False)
    objects.forget(2)
    objects.create(MAX_OBJECTS + 1, "wl_callback", 1, by_server=False)


@given(st.binary(max_size=256), st.booleans())
def test_any_bytes_decode_exactly_or_raise_wire_error(
    protocols: Protocols, data: bytes, request: bool
) -> None:
    """Whatever decodes encodes back to a message of its size with the same arguments (padding
    may differ); the rest is WireError."""
    objects = Objects(protocols)
    objects.create(2, "wl_registry", 1, by_server=False)
    objects.create(3, "wl_compositor", 5, by_server=False)
    buffer = bytearray(data)
    try:
        while (
            decoded := take_message(objects, buffer, deque([5, 6]), request=request)
        ) is not None:
            encoded, _ = encode(decoded.object_id, decoded.opcode, decoded.message, decoded.args)
            assert len(encoded) == len(decoded.raw)
            assert decode_args(decoded.message, encoded[8:], deque([5, 6])) == decoded.args
    except WireError:
        return
