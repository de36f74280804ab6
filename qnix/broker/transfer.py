"""`qnix copy` and `qnix move`: files from one compartment into another's ~/QubesIncoming/.

Like Qubes' qvm-copy / qvm-move, started by the admin on the host. The live policy decides
`qnix.Filecopy` (or `qnix.Filemove`) from the source to the target; the decision may send the
files elsewhere (`target=`), though never to the host or to a new disposable (a copy there
would vanish with it: `qnix open-in-dvm` is for that). Then the source's
`qfile.py pack` writes the stream into a pipe whose other end is the target's
`qfile.py unpack`: the host only hands the two ends to the agents, the bytes never pass
through it. `unpack` (qnix.inside.qfile) writes only below ~/QubesIncoming/SOURCE/ and reports
what arrived as JSON, which is untrusted and checked here before it reaches the audit log.
A move removes the sources only after the target reported success. A stream must end within
the transfer's deadline, and once one end has finished the other within FINISH_TIMEOUT: a
target that stops reading or never reports its end fails the transfer, and as `unpack`
commits only at the end, nothing arrives.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qnix.audit import events
from qnix.broker.decide import Asker, decide, refuse
from qnix.broker.programs import (
    Deadline,
    Drain,
    Outcome,
    Running,
    ensure_running,
    pipe,
    run_capture,
    shown,
    start,
    wait_all,
)
from qnix.errors import QnixError
from qnix.inside import qfile
from qnix.policy.evaluate import DISPVM_PREFIX, HOST, Decision
from qnix.runtime.paths import PathError, RuntimePaths, check_name

SERVICES = {"copy": "qnix.Filecopy", "move": "qnix.Filemove"}
QFILE = "qfile.py"
# Files named in one audit entry (with size and sha256); the counts cover all of them.
AUDIT_FILES = 40
SUMMARY_CAP = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_LIMITS = qfile.Limits()


@dataclass(frozen=True, slots=True)
class Arrived:
    """One entry the target reports as written (a file, folder or symlink)."""

    name: str
    kind: str
    size: int = 0
    sha256: str | None = None

    def audit_line(self) -> str:
        if self.kind == "file":
            return f"{self.sha256} {self.size} {shown(self.name, 200)}"
        return f"{self.kind} {shown(self.name, 200)}"


@dataclass(frozen=True, slots=True)
class Summary:
    """What `unpack` says it wrote (checked for shape and sense, still the target's word)."""

    files: int
    folders: int
    symlinks: int
    bytes: int
    top: tuple[str, ...]
    items: tuple[Arrived, ...]
    items_omitted: int


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ValueError("a count is not a non-negative integer")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a name is not a string")
    try:
        qfile.check_path(value.encode("utf-8", "surrogatepass"))
    except qfile.QfileError as exc:
        raise ValueError(str(exc)) from None
    return value


def parse_summary(untrusted: bytes) -> Summary:
    """The target's report, or ValueError if it is not what `unpack` writes."""
    data = json.loads(untrusted)
    if not isinstance(data, dict) or data.get("ok") is not True:
        raise ValueError("not a summary")
    items = []
    raw_items = data.get("items")
    if not isinstance(raw_items, list) or len(raw_items) > qfile.SUMMARY_ITEMS:
        raise ValueError("items is not a short list")
    for raw in raw_items:
        if not isinstance(raw, dict):
            raise ValueError("an item is not an object")
        kind = raw.get("type")
        if kind == "file":
            sha256 = raw.get("sha256")
            if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
                raise ValueError("a file without a sha256")
            items.append(Arrived(_name(raw.get("name")), "file", _count(raw.get("size")), sha256))
        elif kind == "symlink":
            items.append(Arrived(_name(raw.get("name")), "symlink"))
        else:
            raise ValueError("an item of unknown type")
    top = data.get("top")
    if not isinstance(top, list) or not top or len(top) > qfile.SUMMARY_ITEMS:
        raise ValueError("top is not a short list")
    return Summary(
        files=_count(data.get("files")),
        folders=_count(data.get("folders")),
        symlinks=_count(data.get("symlinks")),
        bytes=_count(data.get("bytes")),
        top=tuple(_name(name) for name in top),
        items=tuple(items),
        items_omitted=_count(data.get("items_omitted")),
    )


@dataclass(frozen=True, slots=True)
class Streamed:
    """Both ends of one stream: the sender's exit code and errors, the receiver's outcome. A
    code is None when that end did not report it in time."""

    deadline: Deadline
    send_code: int | None
    send_errors: bytes
    received: Outcome

    def check(self, failed: str, sender: str, receiver: str) -> None:
        """QnixError "FAILED: why" unless both ends succeeded."""
        if self.received.code is None:
            if self.send_code is None:
                raise QnixError(
                    f"{failed}: {sender} was still sending and {receiver} still receiving "
                    f"after {self.deadline.seconds:g} s",
                    hint=self.deadline.hint(receiver, "stopped reading"),
                )
            if self.send_code == 0:
                why = f"{receiver} did not finish receiving in time, after {sender} had sent all"
            else:
                said = shown(self.send_errors) or f"exit code {self.send_code}"
                why = f"{sender} could not send ({said}), and {receiver} did not finish in time"
            raise QnixError(
                f"{failed}: {why}",
                hint=f"something in {receiver} holds it up: `qnix restart {receiver}` ends it",
            )
        if self.received.code != 0:
            said = shown(self.received.stderr) or f"exit code {self.received.code}"
            if self.send_code not in (0, None) and self.send_errors:
                raise QnixError(f"{failed}: {sender} could not send: {shown(self.send_errors)}")
            raise QnixError(f"{failed}: refused in {receiver}: {said}")
        if self.send_code is None:
            raise QnixError(
                f"{failed}: {sender} did not finish sending in time",
                hint=self.deadline.hint(sender, "stopped sending"),
            )
        if self.send_code != 0:
            said = shown(self.send_errors) or f"exit code {self.send_code}"
            raise QnixError(f"{failed}: {sender} failed after sending: {said}")


def stream(
    sender: Running, send_args: Sequence[str], receiver: Running, receive_argv: Sequence[str]
) -> Streamed:
    """`qfile.py pack SEND_ARGS` in `sender` piped into `receive_argv` in `receiver`, within
    the transfer's deadline."""
    deadline = Deadline.start()
    data_read, data_write = pipe()
    send_errors_read, send_errors_write = pipe(1 << 16)
    out_read, out_write = pipe(1 << 16)
    errors_read, errors_write = pipe(1 << 16)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    ours = (null, data_read, data_write, send_errors_write, out_write, errors_write)
    try:
        sending = start(
            sender,
            sender.program(QFILE, "pack", *send_args),
            (null, data_write, send_errors_write),
        )
        try:
            receiving = start(receiver, receive_argv, (data_read, out_write, errors_write))
        except BaseException:
            sending.sock.close()
            raise
    except BaseException:
        for fd in (send_errors_read, out_read, errors_read):
            os.close(fd)
        raise
    finally:
        # The agents hold their own copies now: the pipe ends when the sender ends.
        for fd in ours:
            os.close(fd)
    send_errors = Drain(send_errors_read)
    out, errors = Drain(out_read, SUMMARY_CAP), Drain(errors_read)
    drains = (send_errors, out, errors)
    try:
        send_code, received_code = wait_all([sending, receiving], drains, deadline.at)
        received = Outcome(received_code, out.result(), errors.result(), out.overflow)
        return Streamed(deadline, send_code, send_errors.result(), received)
    finally:
        for drain in drains:
            drain.close()


def unpack_argv(receiver: Running, source: str, limits: qfile.Limits) -> list[str]:
    return receiver.program(
        QFILE,
        "unpack",
        *("--max-depth", str(limits.max_depth)),
        *("--max-entries", str(limits.max_entries)),
        *("--max-bytes", str(limits.max_bytes)),
        *("--idle-timeout", str(limits.idle_timeout)),
        "--",
        source,
    )


def checked_source(source: str) -> str:
    try:
        return check_name(source)
    except PathError as exc:
        raise QnixError(str(exc)) from None


def checked_paths(untrusted_paths: Sequence[str]) -> list[str]:
    """Paths inside the source as the admin typed them: not empty, no NUL."""
    if not untrusted_paths:
        raise QnixError("name at least one file or folder to send")
    for path in untrusted_paths:
        if not path or "\0" in path:
            raise QnixError(f"{shown(path)} is not a path")
    return list(untrusted_paths)


def check_destination(decision: Decision, what: str) -> str:
    """The compartment an allowed decision sends to; the host and new disposables are not."""
    target = decision.target or ""
    if target.startswith(DISPVM_PREFIX):
        raise QnixError(
            f"the policy sends this {what} to a new disposable ({target}), which would end "
            "before anyone could use it: refused",
            hint="use `qnix open-in-dvm` to work on a file in a disposable",
        )
    if target == HOST or not target:
        raise QnixError(f"the policy sends this {what} to the host: refused")
    return target


def check_user(decision: Decision, running: Running) -> None:
    if decision.user is not None and decision.user != running.user:
        raise QnixError(
            f"the policy line {decision.rule} names user={decision.user}, but "
            f"{running.name} has only the user {running.user}: refused"
        )


@dataclass(frozen=True, slots=True)
class Transferred:
    target: str
    summary: Summary


def transfer(
    paths: RuntimePaths,
    *,
    source: str,
    untrusted_paths: Sequence[str],
    target: str,
    move: bool = False,
    asker: Asker = refuse,
    limits: qfile.Limits = DEFAULT_LIMITS,
) -> Transferred:
    """Copy (or move) `untrusted_paths` of `source` into `target`'s ~/QubesIncoming/SOURCE/,
    as the live policy decides; QnixError (exit code 1) for a deny or any failure."""
    event = "move" if move else "copy"
    source = checked_source(source)
    files = checked_paths(untrusted_paths)
    decision = decide(
        paths,
        untrusted_service=SERVICES[event],
        untrusted_argument="",
        source=source,
        untrusted_target=target,
        asker=asker,
    )
    fields: dict[str, events.FieldValue] = {
        "source": source,
        "target": target[:64],
        "requested": [shown(path, 200) for path in files][:AUDIT_FILES],
        "action": decision.action,
        "rule": decision.rule,
    }
    if decision.action != "allow":
        events.record(paths, event, **fields, result="denied")
        raise QnixError(f"{event} from {source} to {shown(target)} denied: {decision.reason}")
    fields["resolved_target"] = decision.target
    try:
        destination = check_destination(decision, event)
        sender = ensure_running(paths, source)
        receiver = ensure_running(paths, destination, autostart=decision.autostart)
        check_user(decision, receiver)
        streamed = stream(sender, ["--", *files], receiver, unpack_argv(receiver, source, limits))
        streamed.check(f"{event} failed, nothing arrived", source, destination)
        try:
            summary = parse_summary(streamed.received.stdout)
        except ValueError as exc:
            raise QnixError(f"{destination} sent an unreadable report ({exc})") from None
        fields |= _summary_fields(summary)
        if move:
            removed = run_capture(
                sender,
                sender.program(QFILE, "remove", "--", *files),
                doing=f"removing what arrived in {destination}",
            )
            if removed.code != 0:
                raise QnixError(
                    removed.error(f"arrived in {destination}, but removing it in {source} failed")
                )
    except QnixError as exc:
        events.record(paths, event, **fields, result=f"error: {exc.message}"[:1024])
        raise
    events.record(paths, event, **fields, result="ok")
    return Transferred(destination, summary)


def _summary_fields(summary: Summary) -> dict[str, events.FieldValue]:
    return {
        "files": [item.audit_line() for item in summary.items[:AUDIT_FILES]],
        "file_count": summary.files,
        "folder_count": summary.folders,
        "symlink_count": summary.symlinks,
        "bytes": summary.bytes,
        "unlisted": summary.items_omitted + max(0, len(summary.items) - AUDIT_FILES),
    }
