"""Check the audit chain and name the first entry that is not as the writer left it.

The hashes do the proving: a line changed anywhere before the last breaks the next line's
`prev`, the last one no longer matches the head, and a line removed, added or moved breaks the
run of `seq` and `prev`. Each line is checked cheaply (its shape, its seq, its prev, its hash),
so a large log verifies quickly; a line is fully decoded only where something is wrong, to say
what happened there:

* modified  — an entry's content changed (found because the next entry, or the head, no longer
              matches its hash; or the line is no longer an entry qnix writes);
* deleted   — entries missing between two others;
* inserted  — a line that does not belong: a copy of another line, or a second line claiming an
              entry's place while the rest of the chain links past it;
* reordered — an entry standing before one it follows;
* truncated — the log ends before the head's last entry, or inside a line;
* head      — the head is missing, unreadable, or describes another log;
* repaired  — the writer itself recorded (`audit.repair`) that it found the log or head damaged.

Two states a crashed writer leaves behind are accepted, with a note: one complete entry after
the head that links to it (the writer stopped before moving the head on), and part of a line
after the head (it stopped inside write(); the line was never acknowledged). The next append
settles both. A consequence: without a secret, one well-formed entry appended after the head
cannot be told from that crash; the seals (qnix.audit.seal) and the copy forwarded to a remote
syslog are the defence against someone able to write the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qnix.audit.events import (
    GENESIS,
    REPAIR_EVENT,
    TORN_WRITE,
    Head,
    decode,
    head_path,
    read_head,
    split_lines,
)

_GENESIS = GENESIS.encode()
_START = b'{"seq":'
_PREV = b',"prev":"'
_END = b'"}\n'
_REPAIR_MARK = b'"event":"' + REPAIR_EVENT.encode() + b'",'
# From the comma after seq: `,"time":"` (9), the time (27), `",` (2), then `"event":"`.
_EVENT_AFTER_COMMA = 38


@dataclass(frozen=True, slots=True)
class Problem:
    """The first bad entry: its line in the log and the seq that belongs there."""

    line: int
    seq: int
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"entry {self.seq} (line {self.line}): {self.kind}: {self.reason}"

    def to_json(self) -> dict[str, object]:
        return {"line": self.line, "seq": self.seq, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Verification:
    entries: int
    head: Head | None
    problem: Problem | None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": None if self.head is None else self.head._asdict(),
            "problem": None if self.problem is None else self.problem.to_json(),
            "notes": list(self.notes),
        }


def verify(log: Path) -> Verification:
    """Verify the log at `log` against the head beside it."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        data = b""
    return verify_lines(split_lines(data), read_head(head_path(log)))


def _hash(line: bytes) -> bytes:
    return hashlib.sha256(line).hexdigest().encode()


def _facts(line: bytes) -> tuple[int, bytes] | None:
    """The seq and prev of a line shaped like an entry (complete, canonical framing); None
    otherwise. Cheap: no JSON decoding, the hash chain proves the rest."""
    if not (line.startswith(_START) and line.endswith(_END) and line[-76:-67] == _PREV):
        return None
    digits = line[7 : line.find(b",", 7)]
    if not digits.isdigit() or digits.startswith(b"0") or len(digits) > 19:
        return None
    return int(digits), line[-67:-3]


def verify_lines(
    lines: Sequence[bytes], head: Head | str | None, *, check_head: bool = True
) -> Verification:
    """Verify a log given as its lines (each with its line break; the last may lack it).

    `head`: the head, None if there is none, or why it could not be read. With
    `check_head=False` (a copy of the lines from elsewhere, such as a syslog server) the head
    is ignored: the chain is checked, entries cut off its end cannot be seen.
    """
    known_head = head if isinstance(head, Head) and check_head else None
    notes: list[str] = []
    hashes = [_GENESIS]  # hashes[i]: hash of line i (line 0: the genesis)
    offset = 0
    sha256 = hashlib.sha256
    for number, line in enumerate(lines, 1):
        # The common case in one expression (this loop is the cost of verifying): framed as
        # an entry, the seq of this line, linked to the line before.
        comma = line.find(b",", 7)
        if (
            line[-67:-3] == hashes[-1]
            and line[-76:-67] == _PREV
            and line.endswith(_END)
            and line.startswith(_START)
            and line[7:comma] == b"%d" % number
        ):
            if line.startswith(_REPAIR_MARK, comma + _EVENT_AFTER_COMMA):
                repaired = _repair_problem(line, number, notes)
                if repaired is not None:
                    return _failed(number, known_head, notes, repaired)
            hashes.append(sha256(line).hexdigest().encode())
            offset += len(line)
            continue
        if not line.endswith(b"\n"):
            if known_head is not None and (offset, number) == (
                known_head.size,
                known_head.seq + 1,
            ):
                notes.append(
                    f"{len(line)} bytes of an unfinished line after entry {known_head.seq}: a "
                    "writer stopped inside write(); the next append cuts them off"
                )
                break
            return _failed(
                number - 1,
                known_head,
                notes,
                Problem(number, number, "truncated", "the log ends inside this entry"),
            )
        return _failed(number - 1, known_head, notes, _diagnose(lines, number, hashes, known_head))
    entries = len(hashes) - 1
    if not check_head:
        notes.append("the head was not checked: entries cut off the end cannot be seen")
        return Verification(entries, None, None, tuple(notes))
    problem = _head_problem(lines, hashes, offset, head, notes)
    return Verification(entries, known_head, problem, tuple(notes))


def _failed(entries: int, head: Head | None, notes: list[str], problem: Problem) -> Verification:
    return Verification(entries, head, problem, tuple(notes))


def _repair_problem(line: bytes, number: int, notes: list[str]) -> Problem | None:
    try:
        entry = decode(line)
    except ValueError as exc:
        return Problem(number, number, "modified", f"not an entry qnix writes: {exc}")
    what = entry.fields.get("problem")
    detail = entry.fields.get("detail")
    if what == TORN_WRITE:
        notes.append(f"entry {entry.seq}: the writer {detail} (a writer had stopped mid-write)")
        return None
    return Problem(
        number,
        entry.seq,
        "repaired",
        f"the writer found the log damaged ({what}: {detail}); entries before this one may "
        "have been changed or removed",
    )


def _head_problem(
    lines: Sequence[bytes],
    hashes: list[bytes],
    offset: int,
    head: Head | str | None,
    notes: list[str],
) -> Problem | None:
    last = len(hashes) - 1
    if isinstance(head, str):
        return Problem(last + 1, last + 1, "head", f"the head cannot be used: {head}")
    if head is None:
        if last == 0:
            return None
        if last == 1:
            notes.append("no head yet: the first writer stopped before writing it")
            return None
        return Problem(
            last,
            last,
            "head",
            "there is no head beside the log: entries cut off the end cannot be ruled out",
        )
    if head.seq == last:
        if head.hash.encode() != hashes[last]:
            return Problem(last, last, "modified", "its hash does not match the head")
        if head.size != offset:
            return Problem(
                last, last, "head", f"the head records {head.size} bytes, the log has {offset}"
            )
        return None
    if head.seq > last:
        missing = f"entry {last + 1}" if head.seq == last + 1 else f"entries {last + 1}-{head.seq}"
        return Problem(
            last + 1, last + 1, "truncated", f"{missing} of the head's {head.seq} are missing"
        )
    if hashes[head.seq] != head.hash.encode():
        return Problem(head.seq, head.seq, "head", "the head's hash does not match this entry")
    if head.seq == last - 1 and head.size == offset - len(lines[last - 1]):
        notes.append(
            f"entry {last} is written but the head was not moved on (a writer stopped between "
            "the two); the next append moves it"
        )
        return None
    return Problem(
        head.seq + 2,
        head.seq + 2,
        "inserted",
        f"entries after entry {head.seq + 1} were added without moving the head",
    )


def _diagnose(
    lines: Sequence[bytes], number: int, hashes: list[bytes], head: Head | None
) -> Problem:
    """What is wrong at line `number`, whose shape, seq or prev does not follow the lines
    before it (which are intact)."""
    expected = number
    line = lines[number - 1]
    facts = _facts(line)
    if facts is None:
        try:
            decode(line)
        except ValueError as exc:
            return Problem(number, expected, "modified", f"not an entry qnix writes: {exc}")
        return Problem(number, expected, "modified", "not an entry qnix writes")
    seq, prev = facts
    own = _hash(line)
    if own in hashes:
        copied = hashes.index(own)
        return Problem(number, expected, "inserted", f"a copy of line {copied} (entry {seq})")
    following = _facts(lines[number]) if number < len(lines) else None

    def links_to(candidate: bytes) -> bool:
        """Whether the rest of the chain (the next line, or else the head) links to
        `candidate`."""
        if following is not None:
            return following[1] == candidate
        return head is not None and head.hash.encode() == candidate

    if seq == expected:
        if number > 1 and links_to(own):
            return Problem(
                number - 1,
                expected - 1,
                "modified",
                f"its hash is not the prev of entry {expected}, which the rest of the chain "
                "links to",
            )
        return Problem(
            number, expected, "modified", f"its prev is not the hash of line {number - 1}"
        )
    next_seq = following[0] if following is not None else None
    if next_seq == expected + 1 or (
        following is None and head is not None and head.seq == expected
    ):
        return Problem(
            number, expected, "modified", f"it claims seq {seq} where entry {expected} belongs"
        )
    if seq > expected:
        if line in lines[number:]:
            later = list(lines).index(line, number) + 1
            return Problem(number, expected, "inserted", f"a copy of line {later} (entry {seq})")
        if next_seq == expected:
            return Problem(number, expected, "reordered", f"entry {seq} stands before it")
        missing = (
            f"entry {expected} is" if seq == expected + 1 else f"entries {expected}-{seq - 1} are"
        )
        return Problem(number, expected, "deleted", f"{missing} missing before entry {seq}")
    if seq == expected - 1 and prev == hashes[number - 2] and links_to(own):
        return Problem(
            number - 1,
            expected - 1,
            "inserted",
            f"line {number} is entry {seq} too, and the rest of the chain links to it",
        )
    return Problem(number, expected, "reordered", f"entry {seq} stands after entry {expected - 1}")
