"""The one function every lifecycle event goes through.

`record(paths, "start", compartment="work", result="ok")` appends one JSON line to
`<state root>/audit/events.jsonl`: the time (UTC, ISO 8601), the event, the compartment and the
other fields given. Each line is written with a single write() on an O_APPEND descriptor and
fsynced before `record` returns, so concurrent writers never interleave and a line reported
written survives a crash. A later step turns this into the hash-chained log; callers stay as
they are.

Standard library only: `qnix run` records on its fast path.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qnix.runtime.paths import RuntimePaths

EVENTS = frozenset({"start", "stop", "run", "dispose"})
FieldValue = str | int | float | bool | None | list[str]


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def record(paths: RuntimePaths, event: str, **fields: FieldValue) -> None:
    """Append one event to the audit log (created 0600 in a 0700 folder on first use)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    entry: dict[str, FieldValue] = {"time": _now(), "event": event}
    for key, value in fields.items():
        entry[key] = value
    line = json.dumps(entry, separators=(",", ":"), ensure_ascii=True) + "\n"
    log = paths.audit_log
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
