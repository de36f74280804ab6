"""`qnix audit show|verify|export`: read, check and hand on the hash-chained audit log.

`verify` exits 0 when the chain is intact and 1 naming the first bad entry, so a cron job or a
monitoring check can run it as it is.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from qnix.cli.options import STATE_ROOT, runtime_paths
from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.audit.copies import Merged
    from qnix.audit.events import Entry
    from qnix.audit.seal import SealVerification

_F = TypeVar("_F", bound=Callable[..., Any])
FORMATS = ("jsonl", "rfc5424")


def log_options(command: _F) -> _F:
    """--state-root (as the host commands take it) and --log, a log file named directly."""
    command = click.option(
        "--log",
        "log_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Audit log file to read (default: <state root>/audit/events.jsonl).",
    )(command)
    return STATE_ROOT(command)


def filter_options(command: _F) -> _F:
    for option in reversed(
        (
            click.option("--event", "events", multiple=True, help="Only this event (repeatable)."),
            click.option(
                "--compartment",
                "compartments",
                multiple=True,
                help="Only entries about this compartment (also as source or target; repeatable).",
            ),
            click.option(
                "--since", help="Only entries since: 15m, 2h, 7d, 2025-06-01 or 2025-06-01T10:00."
            ),
            click.option("--limit", type=click.IntRange(min=0), help="Only the last N matches."),
        )
    ):
        command = option(command)
    return command


def _log_path(state_root: Path | None, log_file: Path | None) -> Path:
    if log_file is not None:
        if not log_file.is_file():
            raise QnixError(f"{log_file}: no such audit log")
        return log_file
    return runtime_paths(state_root, None).audit_log


def _unreadable(log: Path, exc: OSError) -> QnixError:
    return QnixError(f"cannot read {log}: {exc.strerror or exc}")


def _selection(
    log: Path,
    events: tuple[str, ...],
    compartments: tuple[str, ...],
    since: str | None,
    limit: int | None,
) -> list[tuple[bytes, Entry]]:
    from qnix.audit import query

    try:
        start = None if since is None else query.parse_since(since)
    except ValueError as exc:
        raise QnixError(str(exc), hint="--since 2h, --since 2025-06-01") from exc
    where = query.Filter(frozenset(events), frozenset(compartments), start, limit)
    try:
        matched, unreadable = query.select(query.read(log), where)
    except OSError as exc:
        raise _unreadable(log, exc) from exc
    for item in unreadable:
        click.echo(f"{log}: line {item.line} is not an entry: {item.reason}", err=True)
    return matched


@click.group()
def audit() -> None:
    """The tamper-evident audit log: show it, verify its chain, export it."""


@audit.command()
@log_options
@filter_options
@click.option("--json", "as_json", is_flag=True, help="The log's own JSON lines, for scripts.")
def show(
    state_root: Path | None,
    log_file: Path | None,
    events: tuple[str, ...],
    compartments: tuple[str, ...],
    since: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Show the audit log's entries, oldest first (it does not verify: see `verify`)."""
    from qnix.audit import query

    log = _log_path(state_root, log_file)
    for line, entry in _selection(log, events, compartments, since, limit):
        click.echo(line.decode("ascii").rstrip("\n") if as_json else query.table_line(entry))


@audit.command()
@STATE_ROOT
@click.option(
    "--log",
    "log_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Audit log file to read (default: <state root>/audit/events.jsonl). Given more than "
    "once: copies of one host's log (several receivers'), merged by seq before verifying.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="What the log file holds: the log itself, or RFC 5424 messages a syslog server "
    "received (one a line; the head is then not checked).",
)
@click.option("--json", "as_json", is_flag=True, help="The result as one JSON object.")
@click.option(
    "--verify-key",
    help="The verification key `qnix audit seal --init` showed ('-': read it from standard "
    "input): also check the seals, and say up to which entry the log is proven.",
)
@click.pass_context
def verify(
    ctx: click.Context,
    state_root: Path | None,
    log_files: tuple[Path, ...],
    fmt: str,
    as_json: bool,
    verify_key: str | None,
) -> None:
    """Verify the hash chain: exit 0 if intact, 1 naming the first bad entry."""
    from qnix.audit.events import split_lines
    from qnix.audit.verify import Problem, Verification, verify_lines
    from qnix.audit.verify import verify as verify_log

    logs = [_log_path(state_root, log) for log in log_files] or [_log_path(state_root, None)]
    log = logs[0]
    shown = log if len(logs) == 1 else ", ".join(map(str, logs))
    key = None if verify_key is None else _verification_key(verify_key)
    notes: list[str] = []
    try:
        if len(logs) == 1 and fmt == "rfc5424":
            lines, repeats = _without_repeats(_messages(log))
            result = verify_lines(lines, None, check_head=False)
            if repeats:
                plural = "s" if repeats != 1 else ""
                notes.append(f"{repeats} repeated message{plural} skipped (sent again by a relay)")
        elif len(logs) > 1:
            merged = _merged(logs, fmt)
            lines = list(merged.lines)
            result = verify_lines(lines, None, check_head=False)
            notes += _merge_notes(merged)
            if merged.lost:
                first, last = merged.lost[0]
                which = f"entry {first} is" if first == last else f"entries {first}-{last} are"
                problem = Problem(first, first, "lost", f"{which} in none of the copies")
                result = Verification(first - 1, None, problem, result.notes)
        else:
            result = verify_log(log)
            lines = split_lines(log.read_bytes()) if key is not None and log.exists() else []
    except OSError as exc:
        raise _unreadable(log, exc) from exc
    sealed = None
    if key is not None:
        from qnix.audit.seal import read_seal_key, seal_key_path, verify_seals

        sealed = verify_seals(
            lines,
            result,
            key,
            read_seal_key(seal_key_path(log)),
            host_key_checked=fmt == "jsonl" and len(logs) == 1,
        )
    ok = result.ok and (sealed is None or sealed.problem is None)
    if as_json:
        body = {"log": str(shown), **result.to_json()}
        body["ok"] = ok
        body["notes"] = [*result.notes, *notes]
        if sealed is not None:
            body["seals"] = sealed.to_json()
        click.echo(json.dumps(body, indent=2))
    elif result.problem is not None:
        click.echo(f"{shown}: NOT intact: first bad entry {result.problem}")
    elif sealed is not None and sealed.problem is not None:
        click.echo(f"{shown}: NOT intact: first bad entry {sealed.problem}")
    elif result.entries == 0:
        click.echo(f"{shown}: no entries yet")
    elif sealed is None:
        head = f", head {result.head.seq} {result.head.hash[:16]}" if result.head else ""
        click.echo(f"{shown}: intact, {result.entries} entries{head}")
    if not as_json:
        if sealed is not None:
            _echo_proven(shown, result.entries, sealed)
        for note in [*result.notes, *(sealed.notes if sealed else ()), *notes]:
            click.echo(f"note: {note}")
    ctx.exit(0 if ok else 1)


def _merged(logs: list[Path], fmt: str) -> Merged:
    from qnix.audit.copies import NotAnEntry, merge_copies
    from qnix.audit.events import split_lines

    copies = [_messages(log) if fmt == "rfc5424" else split_lines(log.read_bytes()) for log in logs]
    try:
        return merge_copies(copies)
    except NotAnEntry as exc:
        raise QnixError(
            f"{logs[exc.copy]}: line {exc.line} is not an audit entry",
            hint="give the copies of one host's audit log only",
        ) from exc


def _without_repeats(lines: list[bytes]) -> tuple[list[bytes], int]:
    """The lines in their order, each exact repeat skipped (a relay that crashed sends what it
    had not marked done again), and how many were."""
    kept = list(dict.fromkeys(lines))
    return kept, len(lines) - len(kept)


def _merge_notes(merged: Merged) -> list[str]:
    notes = []
    if merged.repeats:
        plural = "s" if merged.repeats != 1 else ""
        notes.append(
            f"{merged.repeats} repeated message{plural} skipped (in several copies, or sent "
            "again by a relay)"
        )
    if merged.disagreements:
        listed = ", ".join(map(str, merged.disagreements[:10]))
        notes.append(f"the copies disagree on entries {listed}: the one the chain links to is kept")
    return notes


def _echo_proven(log: Path | str, entries: int, sealed: SealVerification) -> None:
    if sealed.last_epoch is None:
        click.echo(f"{log}: proven through no entry: there is no good seal")
    else:
        click.echo(
            f"{log}: proven through entry {sealed.proven_through} (sealed by entry "
            f"{sealed.proven_through + 1}, epoch {sealed.last_epoch}), of {entries}"
        )
    if sealed.unproven is not None:
        first, last = sealed.unproven
        which = f"entry {first}" if first == last else f"entries {first}-{last}"
        click.echo(f"{log}: {which} unproven: written after the last seal")


def _verification_key(text: str) -> bytes:
    from qnix.audit.seal import parse_key_text

    if text == "-":
        text = sys.stdin.readline()
    try:
        return parse_key_text(text)
    except ValueError as exc:
        raise QnixError(
            f"--verify-key: {exc}", hint="give the key `qnix audit seal --init` showed"
        ) from exc


@audit.command()
@log_options
@click.option(
    "--init",
    is_flag=True,
    help="Start sealing: seal the log as it is and show the verification key, once.",
)
def seal(state_root: Path | None, log_file: Path | None, init: bool) -> None:
    """Seal the audit log so far with a key that is then destroyed (forward-secure)."""
    from qnix.audit import seal as sealing

    log = log_file if log_file is not None else runtime_paths(state_root, None).audit_log
    try:
        if not init:
            epoch, seq = sealing.seal(log)
            click.echo(f"{log}: sealed through entry {seq - 1} (entry {seq}, epoch {epoch})")
            return
        key, seq = sealing.init(log)
    except sealing.SealingError as exc:
        hint = "qnix audit seal --init" if not init else "verify with the key shown at --init"
        raise QnixError(str(exc), hint=hint) from exc
    except OSError as exc:
        raise QnixError(f"cannot seal {log}: {exc.strerror or exc}") from exc
    text = sealing.key_text(key)
    click.echo(f"{log}: sealed through entry {seq - 1} (entry {seq}, epoch 0)")
    click.echo("verification key (shown this once; keep it off this machine):")
    click.echo(f"  {text}")
    click.echo(_qr_code(text), nl=False)
    click.echo("check later with: qnix audit verify --verify-key -  (and type the key)")


def _qr_code(text: str) -> str:
    import io

    import qrcode

    code = qrcode.QRCode(border=2)
    code.add_data(text)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue()


def _messages(received: Path) -> list[bytes]:
    """The entries' lines inside RFC 5424 messages (one message a line)."""
    from qnix.audit.events import split_lines
    from qnix.audit.rfc5424 import parse_message

    lines: list[bytes] = []
    for number, raw in enumerate(split_lines(received.read_bytes()), 1):
        try:
            message = parse_message(raw.decode("ascii").rstrip("\n"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise QnixError(f"{received}: line {number} is not an RFC 5424 message") from exc
        lines.append(message.msg.encode("ascii") + b"\n")
    return lines


@audit.command()
@log_options
@filter_options
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (replaced; default: standard output).",
)
@click.option("--hostname", help="HOSTNAME of RFC 5424 messages (default: this host's name).")
def export(
    state_root: Path | None,
    log_file: Path | None,
    events: tuple[str, ...],
    compartments: tuple[str, ...],
    since: str | None,
    limit: int | None,
    fmt: str,
    output: Path | None,
    hostname: str | None,
) -> None:
    """Export entries as JSON lines (the log's own lines, a verifiable chain if unfiltered)
    or as RFC 5424 syslog messages."""
    from qnix.audit import query

    log = _log_path(state_root, log_file)
    host = hostname or socket.gethostname()
    text = "".join(
        query.export_line(line, entry, fmt, host) + "\n"
        for line, entry in _selection(log, events, compartments, since, limit)
    )
    if output is None:
        sys.stdout.write(text)
        return
    from qnix.runtime.files import atomic_write

    atomic_write(output, text.encode("ascii"), mode=0o600)
    click.echo(f"wrote {output}", err=True)


@audit.command("protect-received")
@click.argument(
    "folder",
    required=False,
    type=click.Path(path_type=Path, file_okay=False),
)
def protect_received(folder: Path | None) -> None:
    """Make every received copy of another host's log append-only (chattr +a), on a log
    server (FOLDER: where the receiver writes them, default /var/log/qnix-remote)."""
    from qnix.audit.received import protect
    from qnix.spec.model import RECEIVED_DIR

    where = folder if folder is not None else Path(RECEIVED_DIR)
    done = protect(where)
    click.echo(f"{where}: {len(done.append_only)} files append-only")
    for path in done.unsupported:
        click.echo(f"note: {path}: its file system has no append-only flag")
