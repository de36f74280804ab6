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

A GUI compartment's clipboard is its Wayland selection, reached through its own Wayland filter
(qnix.runtime.waylandproxy, over its root-only control socket), never through a program
inside: `copy` takes the selection a client of SRC holds (the filter asks that client to write
it into a pipe, as the compositor does for a paste), and `paste` makes the data DST's selection
for exactly one receive (the filter offers it to DST's clients and answers the first receive
itself; then it is gone). The type is kept with the data (`mime` in the file's header).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qnix.audit import events
from qnix.broker.decide import Asker, decide, refuse
from qnix.broker.programs import Running, ensure_running, run_capture, shown
from qnix.broker.transfer import check_destination, check_user, checked_source
from qnix.errors import QnixError
from qnix.runtime.files import atomic_write
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.waylandproxy import CONTROL_TIMEOUT, control_socket
from qnix.wayland.rules import TEXT_TYPES

SERVICE = "qnix.Clipboard"
TEXT, BINARY = "+text", "+binary"
DEFAULT_MAX_BYTES = 64 * 1024
PROGRAM = "clipboard.py"
# How long a GUI compartment's client may take to write its selection.
SELECTION_TIMEOUT = 10.0
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Clip:
    owner: str
    copied_at: str
    data: bytes
    # The Wayland type it was copied as (from a GUI compartment), else None.
    mime: str | None = None

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
        meta: dict[str, object] = {"owner": self.owner, "time": self.copied_at, "size": self.size}
        if self.mime is not None:
            meta["mime"] = self.mime
        return (json.dumps(meta, sort_keys=True) + "\n").encode()

    def mime_types(self) -> tuple[str, ...]:
        """The types a GUI compartment's clients are offered it as."""
        if not self.is_text:
            return (self.mime or BINARY_TYPE,)
        first = () if self.mime is None or self.mime in TEXT_TYPES else (self.mime,)
        return (*first, *TEXT_TYPES)


def _checked_mime(untrusted_mime: object) -> str:
    if (
        not isinstance(untrusted_mime, str)
        or not 0 < len(untrusted_mime) <= 255
        or not untrusted_mime.isprintable()
        or " " in untrusted_mime
    ):
        raise ValueError("not a type")
    return untrusted_mime


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
        mime = None if meta.get("mime") is None else _checked_mime(meta["mime"])
    except (ValueError, KeyError, TypeError, QnixError):
        raise QnixError(
            f"the clipboard file {paths.clipboard_file} is damaged",
            hint="qnix clip clear, then copy again",
        ) from None
    return Clip(owner, copied_at, data, mime)


# ---- a GUI compartment's Wayland selection, through its filter -------------------------------


def _filter_of(running: Running) -> str | None:
    """The control socket of a running GUI compartment's filter; None without one."""
    if not running.state.get("gui"):
        return None
    return str(control_socket(running.paths.run_dir(running.name)))


def _ask_filter(control: str, request: bytes, name: str) -> tuple[str, list[int]]:
    """One request to the filter of `name`: its answer line (after `ok`), and descriptors."""
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(CONTROL_TIMEOUT)
            conn.connect(control)
            conn.sendall(request)
            untrusted_answer = b""
            while b"\n" not in untrusted_answer and len(untrusted_answer) < 4096:
                chunk, received, _, _ = socket.recv_fds(conn, 4096, 1)
                fds += received
                if not chunk:
                    break
                untrusted_answer += chunk
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise QnixError(
            f"cannot reach the Wayland filter of {name}: {exc}",
            hint=f"qnix restart {name} from your Wayland session",
        ) from None
    line = untrusted_answer.partition(b"\n")[0].decode(errors="replace")
    if not line.startswith("ok"):
        for fd in fds:
            os.close(fd)
        reason = line.removeprefix("error ") or "no answer"
        raise QnixError(f"the Wayland filter of {name} refused: {shown(reason, 200)}")
    return line.removeprefix("ok").strip(), fds


def _read_selection(fd: int, name: str, max_bytes: int) -> bytes:
    """What the client writes into the pipe until it closes it: at most max_bytes + 1 bytes,
    within SELECTION_TIMEOUT."""
    deadline = time.monotonic() + SELECTION_TIMEOUT
    data = bytearray()
    with open(fd, "rb", buffering=0, closefd=True) as pipe:
        while len(data) <= max_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                raise QnixError(f"the selection of {name} did not arrive in time")
            chunk = pipe.read(max_bytes + 1 - len(data))
            if not chunk:
                break
            data += chunk
    return bytes(data)


def _wayland_copy(running: Running, control: str, max_bytes: int) -> tuple[bytes, str]:
    """The Wayland selection of a GUI compartment (its data, its type)."""
    untrusted_mime, fds = _ask_filter(control, b"copy\n", running.name)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise QnixError(f"the Wayland filter of {running.name} sent no pipe")
    try:
        mime = _checked_mime(untrusted_mime)
    except ValueError:
        os.close(fds[0])
        raise QnixError(f"the Wayland filter of {running.name} named no type") from None
    return _read_selection(fds[0], running.name, max_bytes), mime


def _wayland_paste(running: Running, control: str, clip: Clip) -> None:
    """The clip as the Wayland selection of a GUI compartment, for one receive."""
    types = " ".join(clip.mime_types())
    request = f"paste {clip.size} {types}\n".encode() + clip.data
    _ask_filter(control, request, running.name)


def copy(paths: RuntimePaths, source: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Clip:
    """SOURCE's clipboard becomes the global one (replacing what it held)."""
    source = checked_source(source)
    fields: dict[str, events.FieldValue] = {"action": "copy", "source": source}
    try:
        running = ensure_running(paths, source)
        control = _filter_of(running)
        mime = None
        if control is not None:
            fields["via"] = "wayland"
            untrusted_data, mime = _wayland_copy(running, control, max_bytes)
            overflow = False
        else:
            got = run_capture(
                running,
                running.program(PROGRAM, "get", "--max-bytes", str(max_bytes)),
                doing="reading its clipboard",
                stdout_cap=max_bytes + 1,
            )
            if got.code != 0:
                raise QnixError(got.error(f"cannot read the clipboard of {source}"))
            untrusted_data, overflow = got.stdout, got.stdout_overflow
        if len(untrusted_data) > max_bytes or overflow:
            raise QnixError(
                f"the clipboard of {source} holds more than {max_bytes} bytes: refused",
                hint="qnix clip copy --max-bytes N raises the limit",
            )
        if not untrusted_data:
            raise QnixError(f"the clipboard of {source} is empty")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        clip = Clip(source, stamp, untrusted_data, mime)
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
            control = _filter_of(running)
            if control is not None:
                fields["via"] = "wayland"
                _wayland_paste(running, control, clip)
            else:
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
