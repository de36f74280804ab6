"""`qnix clip` in the filter's rules, on messages built from the protocol files: the source a
compartment's selection is, and a grant carried by the next offer, answered once."""

from __future__ import annotations

import os

from qnix.wayland.protocol import Protocols
from qnix.wayland.rules import Grant, Session, clip_type
from qnix.wayland.wire import Fd
from tests.wayland.test_rules import SERVER, data_device, event, offered, request, session


def granted(protocols: Protocols) -> Session:
    filtered = session(protocols)
    data_device(protocols, filtered)
    filtered.shared.grant = Grant(("text/plain;charset=utf-8", "text/plain"), b"iban")
    return filtered


def test_a_grant_rides_on_the_next_offer_and_is_received_once(protocols: Protocols) -> None:
    filtered = granted(protocols)
    # An offer from elsewhere (never shown without a grant: test_rules) carries the grant,
    # with the grant's types only.
    assert filtered.from_server(offered(protocols, "text/html", "image/png"), []).to_client == []
    shown = filtered.from_server(event(protocols, 12, "wl_data_device", "selection", SERVER), [])
    assert b"".join(data for data, _ in shown.to_client) == offered(
        protocols, "text/plain;charset=utf-8", "text/plain"
    ) + event(protocols, 12, "wl_data_device", "selection", SERVER)
    assert shown.to_server == []

    first, second = os.pipe(), os.pipe()
    try:
        receive = request(protocols, SERVER, "wl_data_offer", "receive", "text/plain", Fd(0))
        answered = filtered.from_client(receive, [first[1]])
        assert (answered.to_server, answered.deliver) == ([], [(first[1], b"iban")])
        assert filtered.shared.grant is None
        # Gone: a second receive is not passed on, and its reader gets nothing.
        again = filtered.from_client(receive, [second[1]])
        assert (again.to_server, again.deliver, again.discard) == ([], [], [second[1]])
        # The offer is the compositor's: its destroy goes there.
        destroy = request(protocols, SERVER, "wl_data_offer", "destroy")
        assert filtered.from_client(destroy, []).to_server == [(destroy, [])]
    finally:
        for fd in (*first, *second):
            os.close(fd)

    # The next offer from elsewhere is hidden again.
    filtered.from_server(event(protocols, 12, "wl_data_device", "data_offer", SERVER + 1), [])
    hidden = filtered.from_server(
        event(protocols, 12, "wl_data_device", "selection", SERVER + 1), []
    )
    assert hidden.to_client == [
        (event(protocols, 12, "wl_data_device", "data_offer", SERVER + 1), []),
        (event(protocols, 12, "wl_data_device", "selection", 0), []),
    ]


def test_the_compositor_is_made_to_send_the_selection_again(protocols: Protocols) -> None:
    filtered = granted(protocols)
    out = filtered.refresh_selection()
    assert [data for data, _ in out.to_server] == [
        request(protocols, 12, "wl_data_device", "release"),
        request(protocols, 10, "wl_data_device_manager", "get_data_device", 12, 11),
    ]
    # The compositor's delete_id for the released id is kept from the client, whose device
    # lives on under it.
    deleted = filtered.from_server(event(protocols, 1, "wl_display", "delete_id", 12), [])
    assert deleted.to_client == []
    filtered.from_server(offered(protocols, "text/plain"), [])
    shown = filtered.from_server(event(protocols, 12, "wl_data_device", "selection", SERVER), [])
    assert shown.to_client[-1] == (event(protocols, 12, "wl_data_device", "selection", SERVER), [])
    # The control: a delete_id the filter did not cause is passed on.
    other = filtered.from_server(event(protocols, 1, "wl_display", "delete_id", 99), [])
    assert other.to_client == [(event(protocols, 1, "wl_display", "delete_id", 99), [])]


def test_the_compartments_own_copy_is_its_selection_and_replaces_a_grant(
    protocols: Protocols,
) -> None:
    filtered = granted(protocols)
    filtered.from_client(
        request(protocols, 10, "wl_data_device_manager", "create_data_source", 13)
        + request(protocols, 13, "wl_data_source", "offer", "text/html")
        + request(protocols, 13, "wl_data_source", "offer", "UTF8_STRING"),
        [],
    )
    assert filtered.shared.owner is None
    filtered.from_client(request(protocols, 12, "wl_data_device", "set_selection", 13, 7), [])
    assert filtered.shared.owner == (filtered, 13)
    assert filtered.shared.grant is None
    assert clip_type(filtered.sources[13]) == "UTF8_STRING"
    # `qnix clip copy`: the client is asked for it as the compositor would ask.
    reader, writer = os.pipe()
    try:
        data, fds = filtered.ask_source(13, "UTF8_STRING", writer)
        assert (data, fds) == (
            event(protocols, 13, "wl_data_source", "send", "UTF8_STRING", Fd(writer)),
            [writer],
        )
    finally:
        os.close(reader)
        os.close(writer)
    # Replaced by another client's copy (the compositor cancels it): no selection of its own.
    cancelled = filtered.from_server(event(protocols, 13, "wl_data_source", "cancelled"), [])
    assert cancelled.to_client == [(event(protocols, 13, "wl_data_source", "cancelled"), [])]
    assert filtered.shared.owner is None


def test_clip_type_prefers_text() -> None:
    assert clip_type(["image/png", "text/plain", "text/plain;charset=utf-8"]) == (
        "text/plain;charset=utf-8"
    )
    assert clip_type(["image/png", "image/jpeg"]) == "image/png"
    assert clip_type([]) is None
