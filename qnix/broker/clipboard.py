"""The host's one global clipboard, as Qubes' Ctrl-Shift-C / Ctrl-Shift-V.

`qnix clip copy SRC` takes SRC's clipboard (qnix/inside/clipboard.py `get`, run as SRC's user)
into `<run root>/clipboard`: a 0600 file holding one JSON line (the owner, the time, size and
sha256) and the data. Copying is the admin's own act on the host and needs no policy line (as
in Qubes), but it is audited. `qnix clip paste DST` asks the live policy for `qnix.Clipboard`
from the clipboard's owner to DST, with the argument `+text` for valid UTF-8 without NUL and
`+binary` for anything else; binary data is delivered only if the deciding line names
`+binary` itself (a `*` line allows text only). Delivered, the clipboard is emptied: one copy,
one paste. A denied or failed paste keeps it. The data is capped (64 KiB by default, Qubes'
limit is about the same) when it is copied, and again when it is delivered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qnix.audit import events
from qnix.broker.decide import Asker, decide, refuse
from qnix.broker.programs import ensure_running, run_capture, shown
from qnix.broker.transfer import check_destination, check_user, checked_source
from qnix.errors import QnixError
from qnix.runtime.files import atomic_write
from qnix.runtime.paths import RuntimePaths

SERVICE = "qnix.Clipboard"
TEXT, BINARY = "+text", "+binary"
DEFAULT_MAX_BYTES = 64 * 1024
PROGRAM = "clipboard.py"


@dataclass(frozen=True, slots=True)
class Clip:
    owner: str
    copied_at: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_text(self) -> bool:
        if b"\0" in self.data:
            return False
        try:
            self.data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    @property
    def kind(self) -> str:
        return "text" if self.is_text else "binary"

    def header(self) -> bytes:
        meta = {"owner": self.owner, "time": self.copied_at, "size": self.size}
        return (json.dumps(meta, sort_keys=True) + "\n").encode()


@contextlib.contextmanager
def _locked(paths: RuntimePaths) -> Iterator[None]:
    """One clipboard change at a time (a paste reads, delivers and clears as one step)."""
    if not paths.run_root.is_dir():
        raise QnixError("no live generation on this host", hint="run `qnix apply SPEC` first")
    fd = os.open(paths.clipboard_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read(paths: RuntimePaths) -> Clip | None:
    """The global clipboard, or None when it is empty."""
    try:
        content = paths.clipboard_file.read_bytes()
    except FileNotFoundError:
        return None
    header, newline, data = content.partition(b"\n")
    try:
        meta = json.loads(header)
        owner, copied_at, size = meta["owner"], meta["time"], meta["size"]
        checked_source(owner)
        if not newline or not isinstance(copied_at, str) or size != len(data):
            raise ValueError("inconsistent")
    except (ValueError, KeyError, TypeError, QnixError):
        raise QnixError(
            f"the clipboard file {paths.clipboard_file} is damaged",
            hint="qnix clip clear, then copy again",
        ) from None
    return Clip(owner, copied_at, data)


def copy(paths: RuntimePaths, source: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Clip:
    """SOURCE's clipboard becomes the global one (replacing what it held)."""
    source = checked_source(source)
    fields: dict[str, events.FieldValue] = {"action": "copy", "source": source}
    try:
        running = ensure_running(paths, source)
        got = run_capture(
            running,
            running.program(PROGRAM, "get", "--max-bytes", str(max_bytes)),
            doing="reading its clipboard",
            stdout_cap=max_bytes + 1,
        )
        if got.code != 0:
            raise QnixError(got.error(f"cannot read the clipboard of {source}"))
        if len(got.stdout) > max_bytes or got.stdout_overflow:
            raise QnixError(
                f"the clipboard of {source} holds more than {max_bytes} bytes: refused",
                hint="qnix clip copy --max-bytes N raises the limit",
            )
        if not got.stdout:
            raise QnixError(f"the clipboard of {source} is empty")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        clip = Clip(source, stamp, got.stdout)
        with _locked(paths):
            atomic_write(paths.clipboard_file, clip.header() + clip.data, 0o600)
    except QnixError as exc:
        events.record(paths, "clipboard", **fields, result=f"error: {exc.message}"[:1024])
        raise
    events.record(
        paths,
        "clipboard",
        **fields,
        size=clip.size,
        sha256=clip.sha256,
        kind=clip.kind,
        result="ok",
    )
    return clip


def paste(
    paths: RuntimePaths,
    target: str,
    *,
    asker: Asker = refuse,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Clip, str]:
    """Deliver the global clipboard to TARGET (once) as the policy decides; the clip and the
    compartment it went to."""
    with _locked(paths):
        clip = read(paths)
        if clip is None:
            raise QnixError("the clipboard is empty", hint="qnix clip copy SRC first")
        argument = TEXT if clip.is_text else BINARY
        decision = decide(
            paths,
            untrusted_service=SERVICE,
            untrusted_argument=argument,
            source=clip.owner,
            untrusted_target=target,
            asker=asker,
            explicit_argument=not clip.is_text,
        )
        fields: dict[str, events.FieldValue] = {
            "action": "paste",
            "source": clip.owner,
            "target": target[:64],
            "size": clip.size,
            "sha256": clip.sha256,
            "kind": clip.kind,
            "decision": decision.action,
            "rule": decision.rule,
        }
        if decision.action != "allow":
            events.record(paths, "clipboard", **fields, result="denied")
            raise QnixError(
                f"paste of {clip.owner}'s clipboard ({clip.kind}) into {shown(target)} denied: "
                f"{decision.reason}"
            )
        try:
            destination = check_destination(decision, "paste")
            fields["resolved_target"] = destination
            if clip.size > max_bytes:
                raise QnixError(f"the clipboard holds more than {max_bytes} bytes: refused")
            running = ensure_running(paths, destination, autostart=decision.autostart)
            check_user(decision, running)
            delivered = run_capture(
                running,
                running.program(PROGRAM, "set", "--max-bytes", str(max_bytes)),
                doing="taking the clipboard",
                stdin=clip.data,
                stdout_cap=4096,
            )
            if delivered.code != 0:
                raise QnixError(delivered.error(f"cannot deliver to {destination}"))
            paths.clipboard_file.unlink(missing_ok=True)
        except QnixError as exc:
            events.record(paths, "clipboard", **fields, result=f"error: {exc.message}"[:1024])
            raise
        events.record(paths, "clipboard", **fields, result="ok")
    return clip, destination


def clear(paths: RuntimePaths) -> bool:
    """Empty the global clipboard; whether it held anything."""
    with _locked(paths):
        try:
            paths.clipboard_file.unlink()
        except FileNotFoundError:
            return False
    events.record(paths, "clipboard", action="clear", result="ok")
    return True
