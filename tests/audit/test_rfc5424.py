"""The RFC 5424 shape of an entry, and reading it back."""

from __future__ import annotations

import pytest

from qnix.audit import events
from qnix.audit.rfc5424 import Message, format_message, hostname_field, parse_message

LINE = events.encode(1, "2025-06-01T10:00:00.000001Z", "start", {"compartment": "w"}, "0" * 64)


def test_an_entry_becomes_one_message_with_the_line_as_msg() -> None:
    text = format_message(LINE, "2025-06-01T10:00:00.000001Z", "ws1.example.org")
    assert text == (
        "<109>1 2025-06-01T10:00:00.000001Z ws1.example.org qnix - audit - "
        '{"seq":1,"time":"2025-06-01T10:00:00.000001Z","event":"start","compartment":"w",'
        f'"prev":"{"0" * 64}"}}'
    )
    assert parse_message(text) == Message(
        109, "2025-06-01T10:00:00.000001Z", "ws1.example.org", "qnix", "-", "audit", "-",
        LINE.decode().rstrip("\n"),
    )  # fmt: skip


@pytest.mark.parametrize("hostname", ["", "with space", "x" * 256, "tab\there", "ünï"])
def test_a_hostname_rfc5424_does_not_allow_becomes_the_nil_value(hostname: str) -> None:
    assert hostname_field(hostname) == "-"
    assert " - qnix - audit - " in format_message(LINE, "2025-06-01T10:00:00Z", hostname)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<109>2 2025-06-01T10:00:00Z h qnix - audit - {}",
        "<192>1 2025-06-01T10:00:00Z h qnix - audit - {}",
        "<109>1 yesterday h qnix - audit - {}",
        "<109>1 2025-06-01T10:00:00Z h qnix - audit",
        "Jun  1 10:00:00 h qnix: {}",
    ],
)
def test_what_is_not_an_rfc5424_message_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an RFC 5424 message"):
        parse_message(text)


def test_a_relay_timestamp_with_an_offset_and_structured_data_parse() -> None:
    message = parse_message('<109>1 2025-06-01T12:00:00.5+02:00 h qnix 42 audit [a b="c"] {}')
    assert (message.timestamp, message.procid, message.structured_data, message.msg) == (
        "2025-06-01T12:00:00.5+02:00",
        "42",
        '[a b="c"]',
        "{}",
    )
