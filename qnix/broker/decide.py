"""One decision of the live policy, answered and audited.

The policy is the one the host was last brought to (`<run root>/generation/policy/`, written
by `qnix apply`), evaluated against the live compartments. An `ask` is put to an `Asker` (the
admin's terminal, or a fixed `--yes`/`--no` for scripts); no answer denies. Every decision is
recorded through the audit hook: who asked, for what, the outcome and the deciding line.
"""

from __future__ import annotations

import os
import select
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
from qnix.runtime import lifecycle
from qnix.runtime.paths import RuntimePaths

ASK_TIMEOUT = 60.0

# Given the decision to ask about, the chosen target, or None for "no".
Asker = Callable[[Decision, str, str], str | None]


def refuse(decision: Decision, source: str, service: str) -> str | None:
    """For scripts that said --no, and for callers with nobody to ask: every ask denies."""
    return None


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


def _live_policy(paths: RuntimePaths) -> tuple[Policy, System]:
    ws = lifecycle.live_workstation(paths)
    if ws is None:
        raise QnixError("no live generation on this host", hint="run `qnix apply SPEC` first")
    policy = load_policy_dir(paths.generation_dir / "policy")
    running = {status.name for status in lifecycle.statuses(paths) if status.state == "running"}
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
