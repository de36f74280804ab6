"""The filter's rules on messages built from the protocol files: exact bytes in, exact out."""

from __future__ import annotations

import os

import pytest

from qnix.wayland.protocol import Protocols
from qnix.wayland.rules import MARKER_PREFIX, Rules, Session, app_id, title
from qnix.wayland.wire import Fd, UntypedNewId, Value, WireError, encode

MARKER = MARKER_PREFIX + "0123456789abcdef"
SERVER = 0xFF000000


def request(protocols: Protocols, object_id: int, interface: str, name: str, *args: Value) -> bytes:
    found = protocols[interface]
    opcode = found.request(name)
    return encode(object_id, opcode, found.requests[opcode], args)[0]


def event(protocols: Protocols, object_id: int, interface: str, name: str, *args: Value) -> bytes:
    found = protocols[interface]
    opcode = found.event(name)
    return encode(object_id, opcode, found.events[opcode], args)[0]


def session(protocols: Protocols, fullscreen: bool = False) -> Session:
    """A client with a registry (2) that was shown wl_compositor (name 1), wl_data_device_manager
    (name 2), wl_seat (name 3) and xdg_wm_base (name 4)."""
    filtered = Session(protocols, Rules("personal", fullscreen, MARKER))
    filtered.from_client(request(protocols, 1, "wl_display", "get_registry", 2), [])
    for name, interface, version in [
        (1, "wl_compositor", 5),
        (2, "wl_data_device_manager", 3),
        (3, "wl_seat", 8),
        (4, "xdg_wm_base", 5),
    ]:
        filtered.from_server(
            event(protocols, 2, "wl_registry", "global", name, interface, version), []
        )
    return filtered


def test_only_allowed_globals_are_shown(protocols: Protocols) -> None:
    filtered = Session(protocols, Rules("personal", False, MARKER))
    filtered.from_client(request(protocols, 1, "wl_display", "get_registry", 2), [])
    screencopy = event(protocols, 2, "wl_registry", "global", 9, "zwlr_screencopy_manager_v1", 3)
    assert filtered.from_server(screencopy, []).to_client == []
    # A newer compositor's wl_seat is shown at the version the protocol files describe.
    seat = filtered.from_server(event(protocols, 2, "wl_registry", "global", 3, "wl_seat", 9), [])
    assert seat.to_client == [(event(protocols, 2, "wl_registry", "global", 3, "wl_seat", 8), [])]
    removed = filtered.from_server(event(protocols, 2, "wl_registry", "global_remove", 9), [])
    assert removed.to_client == []


@pytest.mark.parametrize(
    ("name", "interface", "version", "error"),
    [
        (9, "zwlr_screencopy_manager_v1", 3, "was not shown"),
        (1, "wl_shm", 1, r"\(wl_compositor 5\) as wl_shm 1"),
        (1, "wl_compositor", 6, r"\(wl_compositor 5\) as wl_compositor 6"),
    ],
)
def test_a_bind_beyond_what_was_shown_ends_the_client(
    protocols: Protocols, name: int, interface: str, version: int, error: str
) -> None:
    filtered = session(protocols)
    bind = request(protocols, 2, "wl_registry", "bind", name, UntypedNewId(interface, version, 5))
    with pytest.raises(WireError, match=error):
        filtered.from_client(bind, [])


def toplevel(protocols: Protocols, filtered: Session) -> None:
    """xdg_wm_base 5, wl_surface 6, xdg_surface 7, xdg_toplevel 8."""
    filtered.from_client(
        request(protocols, 2, "wl_registry", "bind", 4, UntypedNewId("xdg_wm_base", 5, 5))
        + request(protocols, 2, "wl_registry", "bind", 1, UntypedNewId("wl_compositor", 5, 9))
        + request(protocols, 9, "wl_compositor", "create_surface", 6)
        + request(protocols, 5, "xdg_wm_base", "get_xdg_surface", 7, 6),
        [],
    )


def test_toplevels_carry_the_compartment_in_app_id_and_title(protocols: Protocols) -> None:
    filtered = session(protocols)
    toplevel(protocols, filtered)
    created = filtered.from_client(request(protocols, 7, "xdg_surface", "get_toplevel", 8), [])
    assert [data for data, _ in created.to_server] == [
        request(protocols, 7, "xdg_surface", "get_toplevel", 8),
        request(protocols, 8, "xdg_toplevel", "set_app_id", "qnix-personal.app"),
        request(protocols, 8, "xdg_toplevel", "set_title", "[personal]"),
    ]
    spoof = filtered.from_client(
        request(protocols, 8, "xdg_toplevel", "set_app_id", "qnix-banking.x")
        + request(protocols, 8, "xdg_toplevel", "set_title", "Bank")
        + request(protocols, 8, "xdg_toplevel", "set_fullscreen", 0),
        [],
    )
    assert [data for data, _ in spoof.to_server] == [
        request(protocols, 8, "xdg_toplevel", "set_app_id", "qnix-personal.qnix-banking.x"),
        request(protocols, 8, "xdg_toplevel", "set_title", "[personal] Bank"),
    ]


def test_fullscreen_passes_where_the_spec_allows_it(protocols: Protocols) -> None:
    filtered = session(protocols, fullscreen=True)
    toplevel(protocols, filtered)
    filtered.from_client(request(protocols, 7, "xdg_surface", "get_toplevel", 8), [])
    asked = request(protocols, 8, "xdg_toplevel", "set_fullscreen", 0)
    assert filtered.from_client(asked, []).to_server == [(asked, [])]


@pytest.mark.parametrize(
    ("untrusted", "expected"),
    [
        (None, "qnix-personal.app"),
        ("org.foo Bar/../x", "qnix-personal.org.fooBar..x"),
        ("✓", "qnix-personal.app"),
    ],
)
def test_app_ids_keep_only_plain_characters(untrusted: str | None, expected: str) -> None:
    assert app_id("personal", untrusted) == expected
    assert title("personal", "x" * 600) == "[personal] " + "x" * 500
    assert title("personal", "\n[banking] Login\u202e") == "[personal] [banking] Login"


def data_device(protocols: Protocols, filtered: Session) -> None:
    """wl_data_device_manager 10, wl_seat 11, wl_data_device 12."""
    filtered.from_client(
        request(
            protocols, 2, "wl_registry", "bind", 2, UntypedNewId("wl_data_device_manager", 3, 10)
        )
        + request(protocols, 2, "wl_registry", "bind", 3, UntypedNewId("wl_seat", 8, 11))
        + request(protocols, 10, "wl_data_device_manager", "get_data_device", 12, 11),
        [],
    )


def test_sources_offer_the_marker_and_cannot_forge_one(protocols: Protocols) -> None:
    filtered = session(protocols)
    data_device(protocols, filtered)
    made = filtered.from_client(
        request(protocols, 10, "wl_data_device_manager", "create_data_source", 13), []
    )
    assert [data for data, _ in made.to_server] == [
        request(protocols, 10, "wl_data_device_manager", "create_data_source", 13),
        request(protocols, 13, "wl_data_source", "offer", MARKER),
    ]
    forged = request(protocols, 13, "wl_data_source", "offer", MARKER_PREFIX + "guess")
    assert filtered.from_client(forged, []).to_server == []


def offered(protocols: Protocols, *mimes: str) -> bytes:
    return event(protocols, 12, "wl_data_device", "data_offer", SERVER) + b"".join(
        event(protocols, SERVER, "wl_data_offer", "offer", mime) for mime in mimes
    )


def test_a_selection_from_elsewhere_is_never_shown(protocols: Protocols) -> None:
    filtered = session(protocols)
    data_device(protocols, filtered)
    held = filtered.from_server(offered(protocols, "text/plain"), [])
    assert held.to_client == []
    selection = filtered.from_server(
        event(protocols, 12, "wl_data_device", "selection", SERVER), []
    )
    # The offer object, without its types (its id must reach the client), and no selection.
    assert selection.to_client == [
        (event(protocols, 12, "wl_data_device", "data_offer", SERVER), []),
        (event(protocols, 12, "wl_data_device", "selection", 0), []),
    ]
    assert selection.to_server == []
    # What comes for it later is not passed on; a receive on it goes nowhere, its fd closed.
    late = filtered.from_server(event(protocols, SERVER, "wl_data_offer", "offer", "x/y"), [])
    assert late.to_client == []
    read, write = os.pipe()
    try:
        receive = request(protocols, SERVER, "wl_data_offer", "receive", "text/plain", Fd(write))
        refused = filtered.from_client(receive, [write])
        assert (refused.to_server, refused.discard) == ([], [write])
    finally:
        os.close(read)
    # Its destroy goes to the compositor, which frees the id.
    destroy = request(protocols, SERVER, "wl_data_offer", "destroy")
    assert filtered.from_client(destroy, []).to_server == [(destroy, [])]


def test_the_ids_the_client_sees_have_no_gap_after_a_hidden_offer(protocols: Protocols) -> None:
    """libwayland ends a client whose next object of the compositor's skips an id."""
    filtered = session(protocols)
    data_device(protocols, filtered)
    filtered.from_server(offered(protocols, "text/plain"), [])
    hidden = filtered.from_server(event(protocols, 12, "wl_data_device", "selection", SERVER), [])
    ours = event(protocols, 12, "wl_data_device", "data_offer", SERVER + 1) + event(
        protocols, SERVER + 1, "wl_data_offer", "offer", MARKER
    )
    filtered.from_server(ours, [])
    shown = filtered.from_server(
        event(protocols, 12, "wl_data_device", "selection", SERVER + 1), []
    )
    assert hidden.to_client[0] == (event(protocols, 12, "wl_data_device", "data_offer", SERVER), [])
    assert shown.to_client[0] == (
        event(protocols, 12, "wl_data_device", "data_offer", SERVER + 1),
        [],
    )


def test_a_selection_of_this_compartment_is_shown_without_the_marker(protocols: Protocols) -> None:
    filtered = session(protocols)
    data_device(protocols, filtered)
    filtered.from_server(offered(protocols, MARKER, "text/plain"), [])
    selection = filtered.from_server(
        event(protocols, 12, "wl_data_device", "selection", SERVER), []
    )
    assert b"".join(data for data, _ in selection.to_client) == offered(
        protocols, "text/plain"
    ) + event(protocols, 12, "wl_data_device", "selection", SERVER)
    assert selection.to_server == []
