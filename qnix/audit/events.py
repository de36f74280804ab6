"""The one function every audit event goes through, and the chain it appends to.

`record(paths, "start", compartment="work", result="ok")` appends one line to
`<state root>/audit/events.jsonl`:

    {"seq":7,"time":"2025-06-01T10:00:00.123456Z","event":"start","compartment":"work",
     "result":"ok","prev":"<sha256 of line 6>"}

* `seq` counts from 1; `prev` is the hex SHA-256 of the previous line's exact bytes (its
  newline included), GENESIS (64 zeros) for the first line. Changing, removing, inserting or
  moving any line breaks the chain at that place (qnix.audit.verify finds it).
* The encoding is canonical: `seq`, `time`, `event`, the other fields sorted by key, `prev`; JSON
  without spaces, ASCII only (everything else, DEL and control characters included, is a \\u
  escape), so a line never holds a raw line break whatever a field contains, and decoding and
  encoding again gives the same bytes.
* The head — the last line's seq, hash and the log's size — is kept apart in `events.head`,
  replaced atomically (temporary file, fsync, rename, fsync of the folder), so cutting lines
  off the end is seen too.
* Writers take an exclusive flock on `events.lock`, read the head, append their line with one
  write() on an O_APPEND descriptor, fsync, then replace the head. A writer that dies between
  the append and the head leaves the log one complete line ahead of the head: that line is
  accepted (it links to the head) and the next writer moves the head on. A writer that dies
  inside write() can leave part of a line after the head: it was never acknowledged, so the
  next writer cuts it off and records an `audit.repair` entry saying so (its size and hash).
  Anything else it finds — the log shorter than the head, lines after the head that do not link
  to it, a missing or unreadable head — it records as an `audit.repair` entry and keeps
  chaining from the head, so the damage stays visible to verify instead of being smoothed over.

Event names are `[a-z][a-z0-9.-]{0,63}`, field keys `[a-z][a-z0-9_]{0,31}` (at most 32 fields);
values are strings, lists of strings, booleans, None, 64-bit integers and finite floats. A
wrong name, key or value type is the caller's mistake and raises ValueError before anything is
written. Strings are taken as they come (they may hold anything a compartment or a user typed);
a line is kept under MAX_LINE_BYTES by shortening the longest values, marked "...[+N]".

Standard library only, and cheap to import — no dataclasses, typing, re or OpenSSL's hashlib,
each of which costs milliseconds: `qnix run` records on its fast path.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from qnix.fastpath import DIGITS, LOWER, Record, is_word

try:
    from _sha256 import sha256  # type: ignore[import-not-found]  # hashlib loads OpenSSL
except ImportError:  # pragma: no cover - Python 3.12 and later call it _sha2
    from hashlib import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any, Protocol

    class HasAuditLog(Protocol):
        """Where the log is (qnix.runtime.paths.RuntimePaths): the audit layer sits below the
        runtime, so it names only what it reads."""

        @property
        def audit_log(self) -> Path: ...


FieldValue = str | int | float | bool | None | list[str]

GENESIS = "0" * 64
RESERVED_KEYS = frozenset({"seq", "time", "event", "prev"})
MAX_FIELDS = 32
# A line, forwarded as an RFC 5424 message, still fits rsyslog's default 8 KiB message size.
MAX_LINE_BYTES = 7680
# The shape of `time`: digits where the 9s are, the other characters as they are.
_TIME_SHAPE = "9999-99-99T99:99:99.999999Z"
INT_LIMIT = 2**63

# What the writer records when it finds the log not as the head describes it.
REPAIR_EVENT = "audit.repair"
TORN_WRITE = "torn-write"  # part of an unacknowledged line after the head: cut off (benign)
HEAD_MISSING = "head-missing"
HEAD_UNREADABLE = "head-unreadable"
LOG_SHORTER = "log-shorter"
UNEXPECTED_TAIL = "unexpected-tail"


def is_event_name(text: str) -> bool:
    """[a-z][a-z0-9.-]{0,63}"""
    return is_word(text, LOWER, LOWER + DIGITS + ".-", 64)


def is_field_key(text: str) -> bool:
    """[a-z][a-z0-9_]{0,31}"""
    return is_word(text, LOWER, LOWER + DIGITS + "_", 32)


def is_hash(text: str) -> bool:
    """A SHA-256 in lower-case hex."""
    return len(text) == 64 and all(character in "0123456789abcdef" for character in text)


def is_time(text: str) -> bool:
    """A UTC time such as 2025-06-01T10:00:00.000000Z (what `now` writes)."""
    return len(text) == len(_TIME_SHAPE) and all(
        (character in DIGITS) if shape == "9" else character == shape
        for character, shape in zip(text, _TIME_SHAPE, strict=True)
    )


class Head(Record):
    """The last entry's seq and hash, and the log's size in bytes after it."""

    __slots__ = ("hash", "seq", "size")
    _FIELDS = ("seq", "hash", "size")
    seq: int
    hash: str
    size: int

    def __init__(self, seq: int, hash: str, size: int) -> None:
        super().__init__(seq, hash, size)

    def encode(self) -> bytes:
        body = {"seq": self.seq, "hash": self.hash, "size": self.size}
        return (json.dumps(body, separators=(",", ":")) + "\n").encode()


EMPTY_HEAD = Head(0, GENESIS, 0)


def head_path(log: Path) -> Path:
    return log.with_suffix(".head")


def lock_path(log: Path) -> Path:
    return log.with_suffix(".lock")


def split_lines(data: bytes) -> list[bytes]:
    """The lines of `data`, each with its line break; a last one without if the data ends
    inside a line. Only b"\\n" ends a line (bytes.splitlines would also split at b"\\r")."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def line_hash(line: bytes) -> str:
    return str(sha256(line).hexdigest())


def now() -> str:
    """UTC, ISO 8601 with microseconds: fixed width, so times compare as strings."""
    stamp = time.time_ns() // 1000
    seconds, micros = divmod(stamp, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


# ---- encoding ------------------------------------------------------------------------------


def check_fields(fields: Mapping[str, object]) -> dict[str, FieldValue]:
    """The fields as given, or ValueError naming the first key or value that cannot be kept."""
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"an audit event has at most {MAX_FIELDS} fields, not {len(fields)}")
    checked: dict[str, FieldValue] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not is_field_key(key) or key in RESERVED_KEYS:
            raise ValueError(
                f"{key!r} is not an audit field key: [a-z][a-z0-9_]{{0,31}}, "
                f"not one of {sorted(RESERVED_KEYS)}"
            )
        checked[key] = _check_value(key, value)
    return checked


def _check_value(key: str, value: object) -> FieldValue:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise ValueError(f"audit field {key!r}: {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"audit field {key!r}: {value} is not a finite number")
        return value
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(
        f"audit field {key!r}: {type(value).__name__} is not a string, list of strings, "
        "number, boolean or None"
    )


def encode(seq: int, when: str, event: str, fields: Mapping[str, FieldValue], prev: str) -> bytes:
    """The canonical line (newline included) for an entry whose fields are already checked."""
    entry: dict[str, Any] = {"seq": seq, "time": when, "event": event}
    for key in sorted(fields):
        entry[key] = fields[key]
    entry["prev"] = prev
    text = json.dumps(entry, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    # JSON allows a raw DEL; syslog relays rewrite it, so it is escaped like the other controls.
    return (text.replace("\x7f", "\\u007f") + "\n").encode("ascii")


# Caps tried in turn until a line fits: characters kept of each string, items of each list.
_CAPS = ((4096, 512), (1024, 128), (256, 32), (64, 8), (16, 2), (0, 1))


def _capped(value: FieldValue, chars: int, items: int) -> FieldValue:
    if isinstance(value, str):
        if len(value) <= chars:
            return value
        return f"{value[:chars]}...[+{len(value) - chars} chars]"
    if isinstance(value, list):
        kept: list[str] = [str(_capped(item, chars, items)) for item in value[:items]]
        if len(value) > items:
            kept.append(f"...[+{len(value) - items} items]")
        return kept
    return value


def fit(seq: int, when: str, event: str, fields: Mapping[str, FieldValue], prev: str) -> bytes:
    """The encoded line; if it is longer than MAX_LINE_BYTES, with every string and list cut
    to the first of _CAPS that makes it fit (the last one always does: 32 keys of at most 32
    characters, each value a marker)."""
    line = encode(seq, when, event, fields, prev)
    for chars, items in _CAPS:
        if len(line) <= MAX_LINE_BYTES:
            break
        capped = {key: _capped(value, chars, items) for key, value in fields.items()}
        line = encode(seq, when, event, capped, prev)
    return line


class Entry(Record):
    __slots__ = ("event", "fields", "prev", "seq", "time")
    _FIELDS = ("seq", "time", "event", "fields", "prev")
    seq: int
    time: str
    event: str
    fields: dict[str, FieldValue]
    prev: str

    def __init__(
        self, seq: int, time: str, event: str, fields: dict[str, FieldValue], prev: str
    ) -> None:
        super().__init__(seq, time, event, fields, prev)

    def __hash__(self) -> int:
        return hash((self.seq, self.time, self.event, self.prev))  # fields: a dict


def decode(line: bytes) -> Entry:
    """One line of the log (newline included) as an Entry, or ValueError saying what is wrong.
    Only a line qnix's writer could have written decodes: anything else is refused."""
    if not line.endswith(b"\n"):
        raise ValueError("the line does not end with a line break")
    try:
        parsed = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    seq, when, event, prev = (parsed.pop(key, None) for key in ("seq", "time", "event", "prev"))
    if type(seq) is not int or seq < 1:
        raise ValueError("seq is not a positive integer")
    if not isinstance(when, str) or not is_time(when):
        raise ValueError("time is not a UTC time such as 2025-06-01T10:00:00.000000Z")
    if not isinstance(event, str) or not is_event_name(event):
        raise ValueError("event is not an event name")
    if not isinstance(prev, str) or not is_hash(prev):
        raise ValueError("prev is not a SHA-256 in hex")
    fields = check_fields(parsed)
    if encode(seq, when, event, fields, prev) != line:
        raise ValueError("not in the canonical encoding qnix writes")
    return Entry(seq, when, event, fields, prev)


# ---- appending ------------------------------------------------------------------------------


def record(paths: HasAuditLog, event: str, **fields: FieldValue) -> None:
    """Append one event to the audit log (created 0600 in a 0700 folder on first use)."""
    append(paths.audit_log, event, fields)


def append(
    log: Path,
    event: str,
    fields: Mapping[str, FieldValue],
    fields_at: Callable[[int, str], Mapping[str, FieldValue]] | None = None,
) -> int:
    """Append one entry to the chain in `log`; its seq once it is on disk (fsynced).

    `fields_at(seq, prev)`, if given, adds fields that depend on where the entry lands (its seq
    and the hash it chains from), computed under the lock (qnix.audit.seal's seals)."""
    if not isinstance(event, str) or not is_event_name(event):
        raise ValueError(f"{event!r} is not an audit event name: [a-z][a-z0-9.-]{{0,63}}")
    checked = check_fields(fields)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(lock_path(log), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        log_fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            base, repairs, data = _base(log, log_fd)
            seq, prev = base.seq, base.hash
            for index, (name, values) in enumerate([*repairs, (event, checked)]):
                seq += 1
                if fields_at is not None and index == len(repairs):
                    values = {**values, **check_fields(fields_at(seq, prev))}
                line = fit(seq, now(), name, values, prev)
                prev = line_hash(line)
                data += line
            _write_all(log_fd, data)
            os.fsync(log_fd)
            _replace_head(log, Head(seq, prev, os.fstat(log_fd).st_size))
        finally:
            os.close(log_fd)
    finally:
        os.close(lock_fd)  # releases the lock
    return seq


Repair = tuple[str, dict[str, FieldValue]]


def _repair(problem: str, detail: str, **extra: FieldValue) -> Repair:
    return REPAIR_EVENT, {"problem": problem, "detail": detail, **extra}


def _base(log: Path, log_fd: int) -> tuple[Head, list[Repair], bytes]:
    """Where the next line goes: the head to chain from, the repairs to record first, and
    the bytes to write before them (a line break if the file ends inside a line)."""
    size = os.fstat(log_fd).st_size
    head = read_head(head_path(log))
    if isinstance(head, Head):
        if size == head.size:
            return head, [], b""
        if size > head.size:
            tail = os.pread(log_fd, size - head.size, head.size)
            if tail.count(b"\n") == 1 and tail.endswith(b"\n") and _follows(tail, head):
                # The last writer stopped between its line and the head: the line stands. The
                # head moves on before anything else is written, so it never lags by two.
                moved = Head(head.seq + 1, line_hash(tail), size)
                os.fsync(log_fd)
                _replace_head(log, moved)
                return moved, [], b""
            if b"\n" not in tail:
                # Part of a line whose write never finished, so it was never acknowledged.
                os.ftruncate(log_fd, head.size)
                return (
                    head,
                    [
                        _repair(
                            TORN_WRITE,
                            f"cut off {len(tail)} bytes of an unfinished line after "
                            f"entry {head.seq}",
                            dropped_bytes=len(tail),
                            dropped_sha256=line_hash(tail),
                        )
                    ],
                    b"",
                )
            detail = f"{size - head.size} bytes after entry {head.seq} do not continue the chain"
            return head, [_repair(UNEXPECTED_TAIL, detail)], _line_break(log_fd, size)
        detail = f"the log has {size} bytes; the head recorded {head.size} after entry {head.seq}"
        return head, [_repair(LOG_SHORTER, detail)], _line_break(log_fd, size)
    if size == 0:
        repairs = [] if head is None else [_repair(HEAD_UNREADABLE, head)]
        return EMPTY_HEAD, repairs, b""
    content = os.pread(log_fd, size, 0)
    complete = content[: content.rfind(b"\n") + 1]
    lines = split_lines(complete)
    last = _last_entry(lines)
    first_writer_stopped = head is None and len(lines) == 1 and complete == content
    if first_writer_stopped and last is not None and (last.seq, last.prev) == (1, GENESIS):
        # The first writer stopped between its line and the head.
        moved = Head(1, line_hash(lines[0]), size)
        os.fsync(log_fd)
        _replace_head(log, moved)
        return moved, [], b""
    seq = last.seq if last is not None else len(lines)
    base = Head(seq, line_hash(lines[-1]) if lines else GENESIS, len(complete))
    problem, detail = (
        (HEAD_MISSING, f"no head beside a log of {size} bytes")
        if head is None
        else (HEAD_UNREADABLE, head)
    )
    return base, [_repair(problem, detail)], _line_break(log_fd, size)


def _last_entry(lines: Sequence[bytes]) -> Entry | None:
    if not lines:
        return None
    try:
        return decode(lines[-1])
    except ValueError:
        return None


def _follows(line: bytes, head: Head) -> bool:
    try:
        entry = decode(line)
    except ValueError:
        return False
    return entry.seq == head.seq + 1 and entry.prev == head.hash


def _line_break(log_fd: int, size: int) -> bytes:
    """A line break if the file ends inside a line, so the next line stands on its own."""
    if size and os.pread(log_fd, 1, size - 1) != b"\n":
        return b"\n"
    return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_head(path: Path) -> Head | str | None:
    """The head; None if there is none; a string saying why it cannot be read otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror}"
    try:
        parsed = json.loads(raw)
    except ValueError:
        return f"{path.name} is not JSON"
    if (
        isinstance(parsed, dict)
        and set(parsed) == {"seq", "hash", "size"}
        and type(parsed["seq"]) is int
        and parsed["seq"] >= 0
        and isinstance(parsed["hash"], str)
        and is_hash(parsed["hash"])
        and type(parsed["size"]) is int
        and parsed["size"] >= 0
    ):
        head = Head(parsed["seq"], parsed["hash"], parsed["size"])
        if head.encode() == raw:
            return head
    return f"{path.name} is not a head qnix wrote"


def _replace_head(log: Path, head: Head) -> None:
    replace_file(head_path(log), head.encode())


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` (0600) atomically and durably: temporary file, fsync, rename, fsync of
    the folder."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
