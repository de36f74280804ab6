"""A small system shared by the policy tests, and helpers to write policies and decisions."""

from __future__ import annotations

from qnix.policy.evaluate import Decision, Domain, System, evaluate
from qnix.policy.load import load_policy_files
from qnix.policy.parse import Policy

POLICY_FILE = "30-t.policy"

# work: persistent, running, default disposable dvm; vault: persistent, no default disposable;
# untrusted: a disposable compartment; dvm and offline-dvm: disposable templates.
SYSTEM = System(
    {
        "work": Domain(
            type="AppVM", tags=frozenset({"work", "trusted"}), default_dispvm="dvm", running=True
        ),
        "personal": Domain(type="AppVM", default_dispvm="dvm"),
        "vault": Domain(type="AppVM", tags=frozenset({"trusted"})),
        "untrusted": Domain(type="DispVM", default_dispvm="dvm", running=True),
        "dvm": Domain(type="DispVM", tags=frozenset({"web"}), template_for_dispvms=True),
        "offline-dvm": Domain(
            type="DispVM", tags=frozenset({"offline"}), template_for_dispvms=True
        ),
    },
    Domain(type="AdminVM", default_dispvm="dvm", running=True),
)


def policy_of(text: str) -> Policy:
    return load_policy_files({POLICY_FILE: text})


def decide(text: str, source: str, target: str, call: str = "test.Svc") -> Decision:
    service, plus, argument = call.partition("+")
    return evaluate(
        policy_of(text),
        SYSTEM,
        untrusted_service=service,
        untrusted_argument=plus + argument,
        source=source,
        untrusted_target=target,
    )


def at(line: int) -> str:
    return f"{POLICY_FILE}:{line}"


def allow(
    target: str,
    line: int,
    *,
    user: str | None = None,
    redirect: str = "",
    notify: bool = False,
    autostart: bool = True,
) -> Decision:
    how = f" (redirected by target={redirect})" if redirect else ""
    return Decision(
        "allow",
        target,
        at(line),
        user,
        reason=f"allowed by {at(line)}{how}",
        notify=notify,
        autostart=autostart,
    )


def denied_by(line: int, *, notify: bool = True) -> Decision:
    return Decision("deny", None, at(line), None, reason=f"denied by {at(line)}", notify=notify)


def denied_at(line: int, why: str) -> Decision:
    return Decision("deny", None, at(line), None, reason=f"{at(line)}: {why}", notify=True)


def refused(why: str) -> Decision:
    """Denied before any line was looked at, or because none matched."""
    return Decision("deny", None, None, None, reason=why, notify=True)


NO_MATCH = refused("no policy line matches")


def ask(
    line: int,
    targets: tuple[str, ...],
    *,
    default: str | None = None,
    user: str | None = None,
    notify: bool = False,
    autostart: bool = True,
) -> Decision:
    return Decision(
        "ask",
        default,
        at(line),
        user,
        targets_for_ask=targets,
        default_target=default,
        reason=f"ask by {at(line)}: choose one of {', '.join(targets)}",
        notify=notify,
        autostart=autostart,
    )
