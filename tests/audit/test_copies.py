"""Merging several receivers' copies of one host's log by seq."""

from __future__ import annotations

import pytest

from qnix.audit.copies import NotAnEntry, merge_copies
from qnix.audit.verify import verify_lines
from tests.audit.test_tamper import build

LINES, _ = build(20)


def test_copies_with_different_gaps_and_repeats_merge_into_the_whole_chain() -> None:
    first = LINES[:8] + LINES[12:]  # missed 9-12 while it was down
    second = LINES[:3] + LINES[5:15] + LINES[10:15]  # missed 4-5 and 16-20, repeats 11-15
    merged = merge_copies([first, second])
    assert (list(merged.lines), merged.lost, merged.disagreements) == (LINES, (), ())
    assert merged.repeats == len(first) + len(second) - 20
    assert verify_lines(list(merged.lines), None, check_head=False).ok


def test_a_gap_in_every_copy_is_lost() -> None:
    first = LINES[:4] + LINES[9:]
    second = LINES[:5] + LINES[8:]
    merged = merge_copies([first, second])
    assert merged.lost == ((6, 8),)
    # One copy alone loses what only the other has.
    assert merge_copies([first]).lost == ((5, 9),)


def test_where_copies_disagree_the_line_the_chain_links_to_is_kept() -> None:
    changed = LINES[4].replace(b'"c5"', b'"cX"')
    tampered = [*LINES[:4], changed, *LINES[5:]]
    merged = merge_copies([tampered, LINES])
    assert merged.disagreements == (5,)
    assert list(merged.lines) == LINES
    # The control: the tampered copy alone does not verify.
    assert not verify_lines(tampered, None, check_head=False).ok


def test_a_line_that_is_no_entry_is_refused_naming_its_copy() -> None:
    with pytest.raises(NotAnEntry, match="copy 2, line 4: not an entry") as raised:
        merge_copies([LINES, [*LINES[:3], b"garbage\n"]])
    assert (raised.value.copy, raised.value.line) == (1, 4)
