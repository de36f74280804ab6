"""What a target compartment reports back is untrusted: the host reads a summary only if it
has exactly the shape `unpack` writes, and shows compartment text escaped."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.broker.programs import shown
from qnix.broker.transfer import Arrived, parse_summary

GOOD: dict[str, Any] = {
    "ok": True,
    "entries": 3,
    "files": 1,
    "folders": 1,
    "symlinks": 1,
    "bytes": 5,
    "top": ["d"],
    "items": [
        {"name": "d/f", "type": "file", "size": 5, "sha256": "a" * 64},
        {"name": "d/l", "type": "symlink", "target": "f"},
    ],
    "items_omitted": 0,
}


def test_a_summary_as_unpack_writes_it() -> None:
    summary = parse_summary(json.dumps(GOOD).encode())
    assert summary.items == (Arrived("d/f", "file", 5, "a" * 64), Arrived("d/l", "symlink"))
    assert summary.top == ("d",)
    assert summary.items[0].audit_line() == f"{'a' * 64} 5 d/f"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ok", False),
        ("files", -1),
        ("files", True),
        ("bytes", 1 << 64),
        ("top", []),
        ("top", ["../x"]),
        ("top", ["a\nb"]),
        ("items", [{"name": "/etc/passwd", "type": "file", "size": 1, "sha256": "a" * 64}]),
        ("items", [{"name": "f", "type": "file", "size": 1, "sha256": "A" * 64}]),
        ("items", [{"name": "f", "type": "fifo"}]),
        ("items", [{"name": "f\u202e", "type": "symlink"}]),
        ("items", [{"name": "f"}] * 300),
        ("items_omitted", "0"),
    ],
)
def test_a_summary_of_another_shape_is_refused(key: str, value: object) -> None:
    with pytest.raises(ValueError):
        parse_summary(json.dumps({**GOOD, key: value}).encode())


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    )
)
def test_any_json_is_either_a_summary_or_refused(value: object) -> None:
    try:
        parse_summary(json.dumps(value).encode())
    except ValueError:
        return
    raise AssertionError(f"accepted {value!r}")


@given(st.text())
def test_shown_text_is_printable_ascii(text: str) -> None:
    assert all(" " <= char <= "~" for char in shown(text))
