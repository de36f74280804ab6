"""Audit entries as RFC 5424 syslog messages, and back.

    <109>1 2025-06-01T10:00:00.123456Z workstation qnix - audit - {"seq":1,...,"prev":"..."}

PRI 109 is facility 13 ("log audit") at severity 5 (notice); APP-NAME `qnix`, MSGID `audit`,
no PROCID and no structured data; MSG is the entry's line exactly as in the log (ASCII JSON,
without its line break), so the lines a syslog server receives still form a verifiable chain.
The rsyslog configuration qnix generates (qnix.compile.rsyslog) sends the same shape; there
the timestamp is the time rsyslog read the line, the entry's own time is inside the JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FACILITY_LOG_AUDIT = 13
SEVERITY_NOTICE = 5
PRI = FACILITY_LOG_AUDIT * 8 + SEVERITY_NOTICE
APP_NAME = "qnix"
MSGID = "audit"
NILVALUE = "-"

# HOSTNAME is 1 to 255 printable US-ASCII characters (RFC 5424, section 6.2.4).
_HOSTNAME_RE = re.compile(r"[\x21-\x7e]{1,255}\Z")
_TIMESTAMP = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_MESSAGE_RE = re.compile(
    r"<(?P<pri>[0-9]{1,3})>1 (?P<timestamp>" + _TIMESTAMP + r"|-) (?P<hostname>[\x21-\x7e]{1,255}) "
    r"(?P<app>[\x21-\x7e]{1,48}) (?P<procid>[\x21-\x7e]{1,128}) (?P<msgid>[\x21-\x7e]{1,32}) "
    r"(?P<sd>-|\[.*?\]) (?P<msg>.*)\Z",
    re.DOTALL,
)


def hostname_field(hostname: str) -> str:
    """`hostname` if RFC 5424 allows it as HOSTNAME, the NILVALUE otherwise."""
    return hostname if _HOSTNAME_RE.match(hostname) else NILVALUE


def format_message(line: bytes, when: str, hostname: str) -> str:
    """One log line (with or without its line break) as an RFC 5424 message, no framing.
    `when` is the entry's time (already RFC 3339)."""
    body = line.removesuffix(b"\n").decode("ascii")
    return f"<{PRI}>1 {when} {hostname_field(hostname)} {APP_NAME} - {MSGID} - {body}"


@dataclass(frozen=True, slots=True)
class Message:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    structured_data: str
    msg: str


def parse_message(text: str) -> Message:
    """An RFC 5424 message (without framing or line break) split into its fields, or
    ValueError."""
    match = _MESSAGE_RE.match(text)
    if match is None or int(match["pri"]) > 191:
        raise ValueError(f"not an RFC 5424 message: {text[:80]!r}")
    return Message(
        int(match["pri"]),
        match["timestamp"],
        match["hostname"],
        match["app"],
        match["procid"],
        match["msgid"],
        match["sd"],
        match["msg"],
    )
