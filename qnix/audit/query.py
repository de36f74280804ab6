"""Reading the audit log for people and other programs: filters, a table, exports.

Reading never verifies (that is `qnix audit verify`); a line that is not an entry is reported
and skipped. Values are shown escaped: a compartment chooses some of them (file names, command
lines), and they must not reach a terminal as control sequences.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qnix.audit.events import Entry, FieldValue, decode, split_lines
from qnix.audit.rfc5424 import format_message

_DURATION_RE = re.compile(r"([1-9][0-9]{0,8})([smhd])\Z")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_DATETIME_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?Z?\Z"
)
_PLAIN_RE = re.compile(r"[A-Za-z0-9._:/@+=,-]+\Z")
# The fields that name a compartment an entry is about (lifecycle, broker and policy events).
COMPARTMENT_KEYS = ("compartment", "source", "target", "resolved_target", "disposable")


@dataclass(frozen=True, slots=True)
class Filter:
    events: frozenset[str] = frozenset()
    compartments: frozenset[str] = frozenset()
    since: str | None = None  # an entry time (fixed width UTC, compares as a string)
    limit: int | None = None  # the last N matches

    def matches(self, entry: Entry) -> bool:
        if self.events and entry.event not in self.events:
            return False
        if self.compartments and not any(
            entry.fields.get(key) in self.compartments for key in COMPARTMENT_KEYS
        ):
            return False
        return self.since is None or entry.time >= self.since


def parse_since(text: str, now: float | None = None) -> str:
    """`--since`: a duration back from now (30s, 15m, 2h, 7d), a date (2025-06-01) or a UTC
    time (2025-06-01T10:00, 2025-06-01T10:00:30Z); as an entry time. ValueError otherwise."""
    duration = _DURATION_RE.match(text)
    if duration:
        moment = (time.time() if now is None else now) - int(duration[1]) * _SECONDS[duration[2]]
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + ".000000Z"
    if _DATE_RE.match(text):
        _check_date(text)
        return f"{text}T00:00:00.000000Z"
    moment_match = _DATETIME_RE.match(text)
    if moment_match:
        day, hours, minutes, seconds = moment_match.groups()
        _check_date(day)
        if int(hours) > 23 or int(minutes) > 59 or int(seconds or 0) > 59:
            raise ValueError(f"{text!r} is not a time of day")
        return f"{day}T{hours}:{minutes}:{seconds or '00'}.000000Z"
    raise ValueError(
        f"{text!r} is not a time: give a duration (30s, 15m, 2h, 7d), a date (2025-06-01) "
        "or a UTC time (2025-06-01T10:00)"
    )


def _check_date(day: str) -> None:
    try:
        time.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"{day!r} is not a date") from None


@dataclass(frozen=True, slots=True)
class Unreadable:
    line: int
    reason: str


def read(log: Path) -> Iterator[tuple[int, bytes, Entry] | Unreadable]:
    """Each line of the log with its number: decoded, or why it is not an entry."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return
    for number, line in enumerate(split_lines(data), 1):
        try:
            yield number, line, decode(line)
        except ValueError as exc:
            yield Unreadable(number, str(exc))


def select(
    items: Iterable[tuple[int, bytes, Entry] | Unreadable], where: Filter
) -> tuple[list[tuple[bytes, Entry]], list[Unreadable]]:
    """The entries that match (the last `limit` of them) and the lines that could not be read."""
    matched: list[tuple[bytes, Entry]] = []
    unreadable: list[Unreadable] = []
    for item in items:
        if isinstance(item, Unreadable):
            unreadable.append(item)
        elif where.matches(item[2]):
            matched.append((item[1], item[2]))
    if where.limit is not None:
        matched = matched[-where.limit :] if where.limit else []
    return matched, unreadable


def _shown(value: FieldValue) -> str:
    if isinstance(value, str) and _PLAIN_RE.match(value):
        return value
    return json.dumps(value, ensure_ascii=True)


def table_line(entry: Entry) -> str:
    """One entry for people: seq, time, event, compartment, then the other fields as key=value,
    every value free of control characters."""
    compartment = entry.fields.get("compartment")
    others = " ".join(
        f"{key}={_shown(value)}" for key, value in entry.fields.items() if key != "compartment"
    )
    where = "-" if compartment is None else _shown(compartment)
    return f"{entry.seq:>6}  {entry.time}  {entry.event:<12}  {where:<12}  {others}".rstrip()


def export_line(line: bytes, entry: Entry, fmt: str, hostname: str) -> str:
    """One entry as exported: the log's own line (`jsonl`) or an RFC 5424 message."""
    if fmt == "jsonl":
        return line.decode("ascii").removesuffix("\n")
    if fmt == "rfc5424":
        return format_message(line, entry.time, hostname)
    raise ValueError(f"unknown export format {fmt!r}")
