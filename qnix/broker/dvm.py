"""`qnix open-in-dvm SRC FILE`: open a file of SRC in a new disposable, as qvm-open-in-dvm.

1. The live policy decides `qnix.OpenInDisposable` from SRC to `@dispvm` (or the target
   given); an allowed decision must name a new disposable (`@dispvm:TEMPLATE`).
2. A fresh disposable of that template starts (disposables.new_disposable); FILE goes there as
   a copy does (qfile pack in SRC piped into qfile unpack in the disposable), so it lands in
   the disposable's ~/QubesIncoming/SRC/.
3. The opener runs there with the admin's terminal: `--with CMD` (split as a shell would,
   never run by one) or `xdg-open`, with the file's path as its last argument. It must not
   return before the user is done (xdg-open of an app that forks does: pass that app
   itself, for example `--with "libreoffice --nofork"`).
4. When it exits, the disposable reports the file's sha256. If it changed, a second decision
   `qnix.OpenInDisposable +edit` (same source and target) says whether the edits may come
   back; a `*` line allows them, as Qubes brings edits back by default; a line such as
   `qnix.OpenInDisposable +edit vault @dispvm deny` keeps them out. Allowed, the disposable's
   file replaces FILE in SRC atomically (qfile replace: only if FILE still has the content
   that was sent, else nothing is replaced). `--view-only` never brings anything back.
5. The disposable is gone afterwards, whatever happened.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from qnix.audit import events
from qnix.broker.decide import Asker, decide, refuse
from qnix.broker.programs import Running, ensure_running, run_capture, shown, start
from qnix.broker.transfer import (
    QFILE,
    SHA256_RE,
    check_user,
    checked_paths,
    checked_source,
    parse_summary,
    stream,
    unpack_argv,
)
from qnix.errors import QnixError
from qnix.inside import qfile
from qnix.policy.evaluate import DISPVM_PREFIX
from qnix.runtime import disposables
from qnix.runtime.paths import RuntimePaths

SERVICE = "qnix.OpenInDisposable"
EDIT = "+edit"
DEFAULT_OPENER = ("xdg-open",)


@dataclass(frozen=True, slots=True)
class Opened:
    disposable: str
    template: str
    opener_code: int
    sent_sha256: str
    changed: bool
    returned: bool  # the edits replaced the file in SRC
    note: str = ""


def _digest(untrusted: bytes) -> str:
    data = json.loads(untrusted)
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        raise ValueError("not a digest")
    if not SHA256_RE.fullmatch(data["sha256"]):
        raise ValueError("not a sha256")
    return str(data["sha256"])


def open_in_disposable(
    paths: RuntimePaths,
    *,
    source: str,
    untrusted_file: str,
    target: str = "@dispvm",
    opener: Sequence[str] | None = None,
    view_only: bool = False,
    asker: Asker = refuse,
    max_bytes: int = qfile.DEFAULT_MAX_BYTES,
    stdio: Sequence[int] = (0, 1, 2),
) -> Opened:
    """Open SOURCE's file in a new disposable; QnixError (exit code 1) for a deny or failure."""
    source = checked_source(source)
    (file,) = checked_paths([untrusted_file])
    decision = decide(
        paths,
        untrusted_service=SERVICE,
        untrusted_argument="",
        source=source,
        untrusted_target=target,
        asker=asker,
    )
    fields: dict[str, events.FieldValue] = {
        "source": source,
        "file": shown(file, 200),
        "target": target[:64],
        "action": decision.action,
        "rule": decision.rule,
    }
    if decision.action != "allow":
        events.record(paths, "open-in-dvm", **fields, result="denied")
        raise QnixError(f"opening {shown(file)} of {source} denied: {decision.reason}")
    try:
        resolved = decision.target or ""
        if not resolved.startswith(DISPVM_PREFIX):
            raise QnixError(
                f"the policy sends this to {shown(resolved)}, not to a new disposable: refused"
            )
        template = resolved.removeprefix(DISPVM_PREFIX)
        fields["template"] = template
        sender = ensure_running(paths, source)
        with disposables.new_disposable(paths, template) as (config, state):
            fields["disposable"] = config.name
            disposable = Running(paths, config.name, state, config.interpreter)
            check_user(decision, disposable)
            opened = _open(
                paths,
                decision_target=target,
                template=template,
                sender=sender,
                disposable=disposable,
                file=file,
                opener=tuple(opener or DEFAULT_OPENER),
                view_only=view_only,
                asker=asker,
                max_bytes=max_bytes,
                stdio=stdio,
                fields=fields,
            )
    except QnixError as exc:
        events.record(paths, "open-in-dvm", **fields, result=f"error: {exc.message}"[:1024])
        raise
    events.record(paths, "open-in-dvm", **fields, result="ok")
    return opened


def _open(
    paths: RuntimePaths,
    *,
    decision_target: str,
    template: str,
    sender: Running,
    disposable: Running,
    file: str,
    opener: tuple[str, ...],
    view_only: bool,
    asker: Asker,
    max_bytes: int,
    stdio: Sequence[int],
    fields: dict[str, events.FieldValue],
) -> Opened:
    source = sender.name
    limits = qfile.Limits(max_depth=1, max_entries=1, max_bytes=max_bytes)
    sent = stream(
        sender,
        ["--single-file", "--", file],
        disposable,
        unpack_argv(disposable, source, limits),
    )
    sent.check(f"cannot send {shown(file)} to {disposable.name}", source, disposable.name)
    try:
        summary = parse_summary(sent.received.stdout)
        (arrived,) = summary.items
        if arrived.kind != "file" or arrived.sha256 is None:
            raise ValueError("not one file")
    except ValueError as exc:
        raise QnixError(f"{disposable.name} sent an unreadable report ({exc})") from None
    fields |= {"sent_sha256": arrived.sha256, "sent_bytes": arrived.size}
    relative = f"{qfile.INCOMING}/{source}/{arrived.name}"
    opener_code = start(disposable, [*opener, f"{disposable.home}/{relative}"], stdio).wait()
    fields["opener"] = [shown(word, 200) for word in opener]
    fields["opener_code"] = opener_code

    def done(changed: bool, returned: bool, note: str = "") -> Opened:
        fields.update(changed=changed, returned=returned, note=note)
        return Opened(
            disposable.name,
            template,
            opener_code,
            arrived.sha256 or "",
            changed,
            returned,
            note,
        )

    if view_only:
        return done(False, False, "view only: nothing comes back")
    digest = run_capture(
        disposable,
        disposable.program(QFILE, "digest", "--", relative),
        doing="reporting the edited file's sha256",
    )
    try:
        edited_sha256 = _digest(digest.stdout) if digest.code == 0 else None
    except ValueError:
        edited_sha256 = None
    if edited_sha256 is None:
        gone = f"the file in {disposable.name} is gone or not a file: {shown(digest.stderr)}"
        return done(True, False, gone)
    if edited_sha256 == arrived.sha256:
        return done(False, False)
    fields["edited_sha256"] = edited_sha256
    edit = decide(
        paths,
        untrusted_service=SERVICE,
        untrusted_argument=EDIT,
        source=source,
        untrusted_target=decision_target,
        asker=asker,
    )
    fields |= {"edit_action": edit.action, "edit_rule": edit.rule}
    if edit.action != "allow":
        return done(True, False, f"edits not brought back: {edit.reason}")
    back = stream(
        disposable,
        ["--single-file", "--", relative],
        sender,
        sender.program(
            QFILE,
            "replace",
            *("--max-bytes", str(max_bytes)),
            *("--expect-sha256", arrived.sha256 or ""),
            "--",
            file,
        ),
    )
    back.check(f"the edits of {shown(file)} did not come back", disposable.name, source)
    try:
        fields["returned_sha256"] = _digest(back.received.stdout)
    except ValueError as exc:
        raise QnixError(f"{source} sent an unreadable report ({exc})") from None
    return done(True, True)
