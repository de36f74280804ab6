"""One decision of the live policy, answered and audited.

The policy is the one the host was last brought to (`<run root>/generation/policy/`, written
by `qnix apply`), evaluated against the live compartments. An `ask` is put to an `Asker` (the
admin's terminal, a fixed `--yes`/`--no` for scripts, or for calls from compartments a
question that waits for `qnix policy answer`); no answer denies. The question preselects the
line's default_target, else the target the caller named when it is on offer, as Qubes' dialog
does. Every decision is recorded through the audit hook: who asked, for what, the outcome and
the deciding line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from qnix.audit import events
from qnix.errors import QnixError
from qnix.policy.evaluate import (
    Decision,
    System,
    answer_ask,
    evaluate,
    system_from_workstation,
)
from qnix.policy.load import load_policy_dir
from qnix.policy.parse import Policy, Rule
from qnix.runtime import live, status
from qnix.runtime.files import atomic_write
from qnix.runtime.paths import RuntimePaths

ASK_TIMEOUT = 60.0

# Given the decision to ask about, the chosen target, or None for "no".
Asker = Callable[[Decision, str, str], str | None]


def refuse(decision: Decision, source: str, service: str) -> str | None:
    """For scripts that said --no, and for callers with nobody to ask: every ask denies."""
    return None


def preselected(decision: Decision, untrusted_target: str) -> Decision:
    """The question as Qubes' dialog puts it: it preselects the line's default_target, else
    the target the caller named when that is on offer (`qnix copy SRC:F personal --yes` then
    means personal, whatever else the line offers)."""
    if decision.default_target is None and untrusted_target in decision.targets_for_ask:
        return dataclasses.replace(decision, target=untrusted_target)
    return decision


def agree(decision: Decision, source: str, service: str) -> str | None:
    """--yes: the target the question preselects (its default_target), else the only offer."""
    if decision.default_target in decision.targets_for_ask:
        return decision.default_target
    if decision.target in decision.targets_for_ask:
        return decision.target
    if len(decision.targets_for_ask) == 1:
        return decision.targets_for_ask[0]
    return None


@dataclass(frozen=True, slots=True)
class TerminalAsker:
    """Asks on the admin's terminal; no answer within `timeout` seconds denies."""

    timeout: float = ASK_TIMEOUT

    def __call__(self, decision: Decision, source: str, service: str) -> str | None:
        try:
            tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None  # nobody to ask
        try:
            offered = ", ".join(decision.targets_for_ask)
            default = decision.default_target or decision.target or ""
            prompt = (
                f"qnix: {source} asks for {service}. Allow? Targets: {offered}\n"
                f"  target [{default}] or 'no' (denied after {self.timeout:.0f} s): "
            )
            os.write(tty, prompt.encode())
            ready, _, _ = select.select([tty], [], [], self.timeout)
            if not ready:
                os.write(tty, b"\nno answer: denied\n")
                return None
            answer = os.read(tty, 256).decode(errors="replace").strip()
        finally:
            os.close(tty)
        if answer.lower() in {"n", "no"}:
            return None
        return answer or default or None


# How long questions from calls of compartments wait for `qnix policy answer`.
ENV_ASK_TIMEOUT = "QNIX_ASK_TIMEOUT"


def ask_timeout() -> float:
    """How long a call's question waits (QNIX_ASK_TIMEOUT seconds, default ASK_TIMEOUT)."""
    try:
        return max(0.0, float(os.environ.get(ENV_ASK_TIMEOUT, ASK_TIMEOUT)))
    except ValueError:
        return ASK_TIMEOUT


@dataclass(frozen=True, slots=True)
class PendingAsker:
    """For calls from a compartment, where no terminal is at hand (Qubes shows a dom0 dialog):
    the question is written to `<run root>/asks/ID.json` (root only) and waits for
    `qnix policy answer ID TARGET|no`; no answer within `timeout` seconds denies. The answer
    must still be one of the offered targets (answer_ask checks it)."""

    paths: RuntimePaths
    timeout: float = ASK_TIMEOUT
    poll: float = 0.1

    def __call__(self, decision: Decision, source: str, service: str) -> str | None:
        folder = self.paths.asks_dir
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ask_id = secrets.token_hex(6)
        question = folder / f"{ask_id}.json"
        answer = folder / f"{ask_id}.answer"
        asked = time.time()
        record = {
            "id": ask_id,
            "source": source,
            "service": service,
            "targets": list(decision.targets_for_ask),
            "default": decision.default_target or decision.target,
            "rule": decision.rule,
            "asked": asked,
            "expires": asked + self.timeout,
        }
        atomic_write(question, (json.dumps(record, indent=2) + "\n").encode(), 0o600)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                try:
                    untrusted_choice = answer.read_text(errors="replace").strip()
                except FileNotFoundError:
                    time.sleep(self.poll)
                    continue
                return None if untrusted_choice in ("", "no") else untrusted_choice
            return None
        finally:
            question.unlink(missing_ok=True)
            answer.unlink(missing_ok=True)


def pending_questions(paths: RuntimePaths) -> list[dict[str, object]]:
    """The questions waiting for an answer, oldest first."""
    found = []
    for path in sorted(paths.asks_dir.glob("*.json")):
        try:
            question = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(question, dict) and float(question.get("expires", 0)) > time.time():
            found.append(question)
    return sorted(found, key=lambda q: float(str(q.get("asked", 0))))


def answer_question(paths: RuntimePaths, ask_id: str, choice: str) -> dict[str, object]:
    """Answer a waiting question with one of its targets, or "no"; the question answered."""
    waiting = {str(q["id"]): q for q in pending_questions(paths)}
    question = waiting.get(ask_id)
    if question is None:
        raise QnixError(
            f"no question {ask_id!r} is waiting (answered, expired, or never asked)",
            hint="qnix policy asks lists the waiting ones",
        )
    offered = question.get("targets")
    targets = [str(t) for t in offered] if isinstance(offered, list) else []
    if choice != "no" and choice not in targets:
        raise QnixError(
            f"{choice!r} is not a target offered by question {ask_id}",
            hint=f"answer one of: {', '.join(targets) or 'none'}, or no",
        )
    atomic_write(paths.asks_dir / f"{ask_id}.answer", (choice + "\n").encode(), 0o600)
    return question


def _live_policy(paths: RuntimePaths) -> tuple[Policy, System]:
    ws = live.require_live(paths)  # after a reboot, until `qnix boot`: nothing is decided
    policy = load_policy_dir(paths.generation_dir / "policy")
    running = {status.name for status in status.statuses(paths) if status.state == "running"}
    return policy, system_from_workstation(ws, running=running)


def live_policy_decision(
    paths: RuntimePaths,
    *,
    untrusted_service: str,
    untrusted_argument: str,
    source: str,
    untrusted_target: str,
) -> Decision:
    """The live policy's decision (pure evaluation; no ask answered, nothing recorded)."""
    policy, system = _live_policy(paths)
    return evaluate(
        policy,
        system,
        untrusted_service=untrusted_service,
        untrusted_argument=untrusted_argument,
        source=source,
        untrusted_target=untrusted_target,
    )


def _rule_at(policy: Policy, where: str | None) -> Rule | None:
    return next((rule for rule in policy.rules if rule.where == where), None)


def decide(
    paths: RuntimePaths,
    *,
    untrusted_service: str,
    untrusted_argument: str,
    source: str,
    untrusted_target: str,
    asker: Asker = refuse,
    explicit_argument: bool = False,
) -> Decision:
    """Decide, answer an ask through `asker`, record the outcome; never raises for a deny.

    `explicit_argument`: allow only if the deciding line names the argument itself; a line
    with `*` as its argument then denies (for what a policy must opt into, such as binary
    clipboard data)."""
    policy, system = _live_policy(paths)
    decision = evaluate(
        policy,
        system,
        untrusted_service=untrusted_service,
        untrusted_argument=untrusted_argument,
        source=source,
        untrusted_target=untrusted_target,
    )
    if explicit_argument and decision.action != "deny":
        rule = _rule_at(policy, decision.rule)
        if rule is None or rule.argument != untrusted_argument:
            decision = Decision(
                "deny",
                None,
                decision.rule,
                None,
                reason=f"{decision.rule} does not name {untrusted_argument[:64]} itself, and "
                "a line with * does not allow it",
            )
    asked = decision.action == "ask"
    if asked:
        decision = preselected(decision, untrusted_target)
        service = untrusted_service + (f"+{untrusted_argument}" if untrusted_argument else "")
        choice = asker(decision, source, service)
        if choice is None:
            decision = Decision(
                "deny", None, decision.rule, None, reason=f"not confirmed ({decision.rule})"
            )
        else:
            decision = answer_ask(decision, choice)
    events.record(
        paths,
        "policy",
        service=untrusted_service[:128],
        argument=untrusted_argument[:128],
        source=source,
        target=untrusted_target[:128],
        action=decision.action,
        resolved_target=decision.target,
        rule=decision.rule,
        asked=asked,
        reason=decision.reason[:512],
    )
    return decision
