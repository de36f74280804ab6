"""Every single-entry tampering of a 1,000-entry log is found, at the right entry.

The log is built in memory with the writer's own encoding; verify_lines gets the tampered
lines and the untouched head, exactly as `verify` would read them from disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from qnix.audit import events
from qnix.audit.events import Head, decode, encode, line_hash, split_lines
from qnix.audit.verify import Verification, verify_lines

COUNT = 1000
EVENTS = ("start", "stop", "run", "dispose", "policy", "copy")


def build(count: int) -> tuple[list[bytes], Head]:
    lines: list[bytes] = []
    prev = events.GENESIS
    for seq in range(1, count + 1):
        fields: dict[str, events.FieldValue] = {
            "compartment": f"c{seq % 7}",
            "result": "ok" if seq % 3 else seq,
            "argv": ["sh", "-c", f"echo {seq}"],
        }
        when = f"2025-06-01T10:{seq // 60 % 60:02d}:{seq % 60:02d}.{seq:06d}Z"
        line = encode(seq, when, EVENTS[seq % len(EVENTS)], fields, prev)
        prev = line_hash(line)
        lines.append(line)
    return lines, Head(count, prev, sum(len(line) for line in lines))


LINES, HEAD = build(COUNT)


def problem_of(result: Verification) -> tuple[int, int, str]:
    assert result.problem is not None, "tampering not found"
    return result.problem.line, result.problem.seq, result.problem.kind


def check_all(
    tampered: Sequence[tuple[list[bytes], tuple[int, int, str]]], head: Head = HEAD
) -> None:
    """Each tampered log against its expected (line, seq, kind); every mismatch listed."""
    wrong = []
    for lines, expected in tampered:
        found = problem_of(verify_lines(lines, head))
        if found != expected:
            wrong.append((expected, found))
    assert wrong == []


def test_the_untouched_log_verifies() -> None:
    result = verify_lines(LINES, HEAD)
    assert (result.ok, result.entries, result.head, result.notes) == (True, COUNT, HEAD, ())
    assert all(decode(line).seq == seq for seq, line in enumerate(LINES, 1))


def replaced(index: int, line: bytes) -> list[bytes]:
    return [*LINES[:index], line, *LINES[index + 1 :]]


def test_every_changed_field_is_found_at_its_entry() -> None:
    tampered = []
    for index, line in enumerate(LINES):
        entry = decode(line)
        fields = {**entry.fields, "result": "tampered"}
        edited = encode(entry.seq, entry.time, entry.event, fields, entry.prev)
        assert edited != line
        tampered.append((replaced(index, edited), (index + 1, index + 1, "modified")))
    check_all(tampered)


def test_every_changed_time_event_or_prev_is_found_at_its_entry() -> None:
    tampered = []
    for index, line in enumerate(LINES):
        entry = decode(line)
        kind = index % 3
        if kind == 0:
            edited = encode(entry.seq, entry.time.replace("2025", "2024"), entry.event,
                            entry.fields, entry.prev)  # fmt: skip
        elif kind == 1:
            edited = encode(entry.seq, entry.time, "forged", entry.fields, entry.prev)
        else:
            edited = encode(entry.seq, entry.time, entry.event, entry.fields, "f" * 64)
        tampered.append((replaced(index, edited), (index + 1, index + 1, "modified")))
    check_all(tampered)


def test_every_flipped_byte_is_found_at_its_entry() -> None:
    """One byte of each entry flipped, at a position walking through the line: braces, seq
    digits, time, event, fields, prev, the line break."""
    tampered = []
    for index, line in enumerate(LINES):
        position = (index * 7919) % len(line)
        if index == COUNT - 1:
            position = len(line) - 1  # the last line break: the log now ends inside the entry
        flipped = bytearray(line)
        flipped[position] ^= 0x01
        kind = "truncated" if index == COUNT - 1 else "modified"
        # As read back from the file: a flipped line break joins two lines.
        lines = split_lines(b"".join(replaced(index, bytes(flipped))))
        tampered.append((lines, (index + 1, index + 1, kind)))
    check_all(tampered)


def test_every_flipped_line_break_is_found_at_its_entry() -> None:
    tampered = []
    for index, line in enumerate(LINES[:-1]):
        joined = line[:-1] + b" " + LINES[index + 1]
        lines = [*LINES[:index], joined, *LINES[index + 2 :]]
        tampered.append((lines, (index + 1, index + 1, "modified")))
    check_all(tampered)


def test_every_deletion_is_found_where_the_entry_was() -> None:
    tampered = []
    for index in range(COUNT):
        lines = [*LINES[:index], *LINES[index + 1 :]]
        kind = "truncated" if index == COUNT - 1 else "deleted"
        tampered.append((lines, (index + 1, index + 1, kind)))
    check_all(tampered)


def test_every_swap_of_neighbours_is_found_at_the_first_of_them() -> None:
    tampered = []
    for index in range(COUNT - 1):
        lines = list(LINES)
        lines[index], lines[index + 1] = lines[index + 1], lines[index]
        tampered.append((lines, (index + 1, index + 1, "reordered")))
    check_all(tampered)


def forged(position: int) -> bytes:
    """A well-formed entry for line `position` that links to the line before it."""
    prev = events.GENESIS if position == 1 else line_hash(LINES[position - 2])
    fields: dict[str, events.FieldValue] = {"compartment": "vault", "result": "ok"}
    return encode(position, "2025-06-01T09:00:00.000000Z", "stop", fields, prev)


def test_a_forged_linked_entry_inserted_anywhere_is_found() -> None:
    tampered = []
    for position in range(1, COUNT + 1):
        lines = [*LINES[: position - 1], forged(position), *LINES[position - 1 :]]
        tampered.append((lines, (position, position, "inserted")))
    check_all(tampered)


def test_a_copied_entry_inserted_anywhere_is_found() -> None:
    tampered = []
    for position in range(1, COUNT + 2):
        # Replay the entry before the position (the second one for position 1).
        copy = LINES[position - 2] if position > 1 else LINES[1]
        lines = [*LINES[: position - 1], copy, *LINES[position - 1 :]]
        tampered.append((lines, (position, position, "inserted")))
    check_all(tampered)


def test_one_linked_entry_after_the_head_reads_as_a_crashed_writer() -> None:
    """The documented limit: an entry appended after the head that links to it looks exactly
    like the line of a writer that stopped before moving the head on. Two are not accepted."""
    one = [*LINES, forged(COUNT + 1)]
    result = verify_lines(one, HEAD)
    assert result.ok
    assert result.notes == (
        f"entry {COUNT + 1} is written but the head was not moved on (a writer stopped "
        "between the two); the next append moves it",
    )
    second = encode(COUNT + 2, "2025-06-01T09:00:00.000000Z", "stop", {}, line_hash(one[-1]))
    assert problem_of(verify_lines([*one, second], HEAD)) == (COUNT + 2, COUNT + 2, "inserted")


def test_truncation_to_every_number_of_entries_is_found() -> None:
    tampered = [(LINES[:kept], (kept + 1, kept + 1, "truncated")) for kept in range(COUNT)]
    check_all(tampered)


def test_truncation_inside_every_entry_is_found() -> None:
    tampered = []
    for index, line in enumerate(LINES):
        cut = 1 + (index * 31) % (len(line) - 1)  # 1 .. len-1: never the whole line
        lines = [*LINES[:index], line[:cut]]
        tampered.append((lines, (index + 1, index + 1, "truncated")))
    check_all(tampered)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (HEAD._replace(seq=COUNT + 1), (COUNT + 1, COUNT + 1, "truncated")),
        (HEAD._replace(hash="0" * 64), (COUNT, COUNT, "modified")),
        (HEAD._replace(size=HEAD.size + 1), (COUNT, COUNT, "head")),
        (HEAD._replace(seq=COUNT - 1), (COUNT - 1, COUNT - 1, "head")),
        (None, (COUNT, COUNT, "head")),
        ("events.head is not JSON", (COUNT + 1, COUNT + 1, "head")),
    ],
)
def test_a_head_that_does_not_describe_the_log_is_found(
    head: Head | str | None, expected: tuple[int, int, str]
) -> None:
    assert problem_of(verify_lines(LINES, head)) == expected


def test_the_problem_says_what_happened_where() -> None:
    lines = [*LINES[:41], *LINES[42:]]
    result = verify_lines(lines, HEAD)
    assert str(result.problem) == "entry 42 (line 42): deleted: entry 42 is missing before entry 43"
    assert result.to_json()["problem"] == {
        "line": 42,
        "seq": 42,
        "kind": "deleted",
        "reason": "entry 42 is missing before entry 43",
    }


def test_a_copy_without_its_head_checks_the_chain_only() -> None:
    result = verify_lines(LINES[:500], None, check_head=False)
    assert (result.ok, result.entries) == (True, 500)
    assert result.notes == ("the head was not checked: entries cut off the end cannot be seen",)
    assert problem_of(verify_lines(LINES[:10] + LINES[11:500], None, check_head=False)) == (
        11,
        11,
        "deleted",
    )
