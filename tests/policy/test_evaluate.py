"""Every semantic rule of Qubes 4.1+ policy evaluation, one exact Decision per case."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qnix.policy.evaluate import Decision, answer_ask
from tests.policy.helpers import (
    NO_MATCH,
    allow,
    ask,
    at,
    decide,
    denied_at,
    denied_by,
    refused,
)

# What `@anyvm` offers to work: every compartment and disposable template by name, a fresh
# disposable of each template, never the host and never the caller itself.
ALL_BUT_WORK = (
    "@dispvm:dvm",
    "@dispvm:offline-dvm",
    "dvm",
    "offline-dvm",
    "personal",
    "untrusted",
    "vault",
)
SELF = "a call to oneself is denied"


@dataclass(frozen=True)
class Case:
    id: str
    policy: str
    source: str
    target: str
    expected: Decision
    call: str = "test.Svc"


CASES = [
    # ---- first match wins, no match denies
    Case(
        "first-match-wins-allow",
        "test.Svc * work personal allow\ntest.Svc * work personal deny",
        "work",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "first-match-wins-deny",
        "test.Svc * work personal deny\ntest.Svc * work personal allow",
        "work",
        "personal",
        denied_by(1),
    ),
    Case(
        "comments-and-blanks-count-as-lines",
        "# office\n\n   \n  # indented comment\ntest.Svc * work personal allow",
        "work",
        "personal",
        allow("personal", 5),
    ),
    Case("no-match-denies", "test.Svc * work vault allow", "work", "personal", NO_MATCH),
    Case("empty-policy-denies", "", "work", "personal", NO_MATCH),
    Case("other-service", "other.Svc * work personal allow", "work", "personal", NO_MATCH),
    Case("any-service", "* * work personal allow", "work", "personal", allow("personal", 1)),
    # ---- arguments
    Case(
        "argument-must-equal",
        "test.Svc +foo work personal allow",
        "work",
        "personal",
        NO_MATCH,
        call="test.Svc+bar",
    ),
    Case(
        "argument-equal",
        "test.Svc +foo work personal allow",
        "work",
        "personal",
        allow("personal", 1),
        call="test.Svc+foo",
    ),
    Case(
        "plus-is-no-argument",
        "test.Svc + work personal allow",
        "work",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "plus-is-not-any-argument",
        "test.Svc + work personal allow",
        "work",
        "personal",
        NO_MATCH,
        call="test.Svc+x",
    ),
    Case(
        "star-is-any-argument",
        "test.Svc * work personal allow",
        "work",
        "personal",
        allow("personal", 1),
        call="test.Svc+any.thing",
    ),
    # ---- sources: @anyvm, *, @adminvm, tags, types
    Case(
        "anyvm-source-is-not-the-host",
        "test.Svc * @anyvm personal allow",
        "@adminvm",
        "personal",
        NO_MATCH,
    ),
    Case(
        "anyvm-source-is-a-compartment",
        "test.Svc * @anyvm personal allow",
        "untrusted",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "star-source-is-the-host",
        "test.Svc * * personal allow",
        "@adminvm",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "adminvm-source-dom0-alias",
        "test.Svc * @adminvm personal allow",
        "dom0",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "adminvm-source-is-only-the-host",
        "test.Svc * @adminvm personal allow",
        "work",
        "personal",
        NO_MATCH,
    ),
    Case(
        "tag-source",
        "test.Svc * @tag:trusted personal allow",
        "vault",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "tag-source-miss",
        "test.Svc * @tag:trusted personal allow",
        "untrusted",
        "personal",
        NO_MATCH,
    ),
    Case(
        "type-source-miss",
        "test.Svc * @type:AppVM personal allow",
        "untrusted",
        "personal",
        NO_MATCH,
    ),
    Case(
        "template-source-never-matches",
        "test.Svc * @dispvm:dvm personal allow\ntest.Svc * @dispvm:@tag:web personal allow",
        "untrusted",
        "personal",
        NO_MATCH,
    ),
    Case(
        "unknown-source-matches-anyvm",
        "test.Svc * @anyvm personal allow",
        "ghost",
        "personal",
        allow("personal", 1),
    ),
    Case(
        "unknown-source-has-no-tags",
        "test.Svc * @tag:trusted personal allow",
        "ghost",
        "personal",
        NO_MATCH,
    ),
    # ---- targets: @anyvm, *, the host
    Case(
        "anyvm-target-is-not-the-host",
        "test.Svc * work @anyvm allow",
        "work",
        "@adminvm",
        NO_MATCH,
    ),
    Case(
        "star-target-is-the-host",
        "test.Svc * work * allow",
        "work",
        "@adminvm",
        allow("@adminvm", 1),
    ),
    Case(
        "adminvm-target-dom0-alias",
        "test.Svc * work @adminvm allow",
        "work",
        "dom0",
        allow("@adminvm", 1),
    ),
    Case(
        "dom0-in-a-line-is-the-host",
        "test.Svc * work dom0 allow",
        "work",
        "@adminvm",
        allow("@adminvm", 1),
    ),
    Case(
        "type-adminvm-is-the-host",
        "test.Svc * work @type:AdminVM allow",
        "work",
        "@adminvm",
        allow("@adminvm", 1),
    ),
    Case("tag-target", "test.Svc * work @tag:trusted allow", "work", "vault", allow("vault", 1)),
    Case("tag-target-miss", "test.Svc * work @tag:trusted allow", "work", "personal", NO_MATCH),
    Case(
        "type-target",
        "test.Svc * work @type:DispVM allow",
        "work",
        "untrusted",
        allow("untrusted", 1),
    ),
    Case(
        "tag-never-covers-a-disposable-request",
        "test.Svc * work @tag:web allow",
        "work",
        "@dispvm:dvm",
        NO_MATCH,
    ),
    # ---- @default
    Case(
        "anyvm-matches-default-but-allow-needs-a-target",
        "test.Svc * work @anyvm allow",
        "work",
        "",
        denied_at(1, "neither the caller nor the policy names a target (@default)"),
    ),
    Case(
        "unknown-target-is-default",
        "test.Svc * work @default allow target=personal",
        "work",
        "ghost",
        allow("personal", 1, redirect="personal"),
    ),
    Case(
        "explicit-default",
        "test.Svc * work @default allow target=personal",
        "work",
        "@default",
        allow("personal", 1, redirect="personal"),
    ),
    Case(
        "default-line-does-not-match-a-name",
        "test.Svc * work @default allow target=personal",
        "work",
        "personal",
        NO_MATCH,
    ),
    # ---- redirects
    Case(
        "redirect-is-not-checked-again",
        "test.Svc * work vault deny\ntest.Svc * work @default allow target=vault",
        "work",
        "",
        allow("vault", 2, redirect="vault"),
    ),
    Case(
        "redirect-from-a-name",
        "test.Svc * work personal allow target=vault",
        "work",
        "personal",
        allow("vault", 1, redirect="vault"),
    ),
    Case(
        "redirect-to-a-missing-compartment",
        "test.Svc * work personal allow target=ghost",
        "work",
        "personal",
        denied_at(1, "target 'ghost' does not exist"),
    ),
    Case(
        "redirect-to-dispvm",
        "test.Svc * work personal allow target=@dispvm",
        "work",
        "personal",
        allow("@dispvm:dvm", 1, redirect="@dispvm"),
    ),
    Case(
        "redirect-to-dom0",
        "test.Svc * work personal allow target=dom0",
        "work",
        "personal",
        allow("@adminvm", 1, redirect="dom0"),
    ),
    # ---- calls to oneself
    Case("self-call", "test.Svc * @anyvm @anyvm allow", "work", "work", denied_at(1, SELF)),
    Case(
        "redirect-to-self",
        "test.Svc * work personal allow target=work",
        "work",
        "personal",
        denied_at(1, SELF),
    ),
    Case(
        "redirect-away-from-self",
        "test.Svc * work work allow target=personal",
        "work",
        "work",
        allow("personal", 1, redirect="personal"),
    ),
    Case("host-to-host", "test.Svc * * * allow", "@adminvm", "dom0", denied_at(1, SELF)),
    # ---- disposables
    Case(
        "dispvm-is-the-default-template",
        "test.Svc * work @dispvm allow",
        "work",
        "@dispvm",
        allow("@dispvm:dvm", 1),
    ),
    Case(
        "dispvm-without-a-default-template",
        "test.Svc * vault @dispvm allow",
        "vault",
        "@dispvm",
        denied_at(1, "vault has no default disposable template for @dispvm"),
    ),
    Case(
        "dispvm-line-does-not-match-a-named-template",
        "test.Svc * work @dispvm allow",
        "work",
        "@dispvm:dvm",
        NO_MATCH,
    ),
    Case(
        "template-line-matches-dispvm-through-the-default",
        "test.Svc * work @dispvm:dvm allow",
        "work",
        "@dispvm",
        allow("@dispvm:dvm", 1),
    ),
    Case(
        "template-line-other-template",
        "test.Svc * work @dispvm:offline-dvm allow",
        "work",
        "@dispvm",
        NO_MATCH,
    ),
    Case(
        "template-line-named-template",
        "test.Svc * work @dispvm:offline-dvm allow",
        "work",
        "@dispvm:offline-dvm",
        allow("@dispvm:offline-dvm", 1),
    ),
    Case(
        "dispvm-tag-named-template",
        "test.Svc * work @dispvm:@tag:web allow",
        "work",
        "@dispvm:dvm",
        allow("@dispvm:dvm", 1),
    ),
    Case(
        "dispvm-tag-default-template",
        "test.Svc * work @dispvm:@tag:web allow",
        "work",
        "@dispvm",
        allow("@dispvm:dvm", 1),
    ),
    Case(
        "dispvm-tag-untagged-template",
        "test.Svc * work @dispvm:@tag:web allow",
        "work",
        "@dispvm:offline-dvm",
        NO_MATCH,
    ),
    Case(
        "dispvm-tag-is-not-the-template-itself",
        "test.Svc * work @dispvm:@tag:web allow",
        "work",
        "dvm",
        NO_MATCH,
    ),
    Case(
        "request-for-a-non-template",
        "test.Svc * * * allow",
        "work",
        "@dispvm:personal",
        refused("'@dispvm:personal' names no disposable template"),
    ),
    Case(
        "anyvm-matches-dispvm",
        "test.Svc * work @anyvm allow",
        "work",
        "@dispvm",
        allow("@dispvm:dvm", 1),
    ),
    # ---- parameters
    Case(
        "user",
        "test.Svc * work personal allow user=alice",
        "work",
        "personal",
        allow("personal", 1, user="alice"),
    ),
    Case(
        "deny-notify-no",
        "test.Svc * work personal deny notify=no",
        "work",
        "personal",
        denied_by(1, notify=False),
    ),
    Case(
        "allow-notify-yes",
        "test.Svc * work personal allow notify=yes",
        "work",
        "personal",
        allow("personal", 1, notify=True),
    ),
    Case(
        "autostart-no-running-target",
        "test.Svc * personal work allow autostart=no",
        "personal",
        "work",
        allow("work", 1, autostart=False),
    ),
    Case(
        "autostart-no-halted-target",
        "test.Svc * work personal allow autostart=no",
        "work",
        "personal",
        denied_at(1, "personal is not running and the line says autostart=no"),
    ),
    Case(
        "autostart-no-disposable",
        "test.Svc * work @dispvm allow autostart=no",
        "work",
        "@dispvm",
        denied_at(1, "@dispvm:dvm is not running and the line says autostart=no"),
    ),
    Case(
        "autostart-no-host",
        "test.Svc * work @adminvm allow autostart=no",
        "work",
        "@adminvm",
        allow("@adminvm", 1, autostart=False),
    ),
    # ---- ask: the targets offered
    Case("ask-anyvm", "test.Svc * work @anyvm ask", "work", "personal", ask(1, ALL_BUT_WORK)),
    Case(
        "ask-deny-line-removes",
        "test.Svc * work vault deny\ntest.Svc * work @anyvm ask",
        "work",
        "personal",
        ask(2, tuple(t for t in ALL_BUT_WORK if t != "vault")),
    ),
    Case(
        "ask-earlier-line-wins",
        "test.Svc * work @tag:trusted ask\ntest.Svc * work @anyvm deny",
        "work",
        "vault",
        ask(1, ("vault",)),
    ),
    Case(
        "ask-allow-line-adds",
        "test.Svc * work personal allow\ntest.Svc * work vault ask",
        "work",
        "vault",
        ask(2, ("personal", "vault")),
    ),
    Case(
        "ask-ignores-other-sources-and-services",
        "test.Svc * personal untrusted allow\nother.Svc * work untrusted allow\n"
        "test.Svc +x work untrusted allow\ntest.Svc * work vault ask",
        "work",
        "vault",
        ask(4, ("vault",)),
    ),
    Case(
        "ask-star-offers-the-host",
        "test.Svc * work * ask",
        "work",
        "@adminvm",
        ask(1, ("@adminvm", *ALL_BUT_WORK)),
    ),
    Case(
        "ask-dispvm-becomes-the-default-template",
        "test.Svc * work @dispvm ask",
        "work",
        "@dispvm",
        ask(1, ("@dispvm:dvm",)),
    ),
    Case(
        "ask-redirect-offers-one",
        "test.Svc * work @anyvm ask target=vault default_target=vault",
        "work",
        "personal",
        ask(1, ("vault",), default="vault"),
    ),
    Case(
        "ask-default-target",
        "test.Svc * work @tag:trusted ask default_target=vault",
        "work",
        "vault",
        ask(1, ("vault",), default="vault"),
    ),
    Case(
        "ask-default-target-not-offered-is-dropped",
        "test.Svc * work vault ask default_target=personal",
        "work",
        "vault",
        ask(1, ("vault",)),
    ),
    Case(
        "ask-default-target-dispvm",
        "test.Svc * work @dispvm:@tag:web ask default_target=@dispvm",
        "work",
        "@dispvm",
        ask(1, ("@dispvm:dvm",), default="@dispvm:dvm"),
    ),
    Case(
        "ask-default-with-redirect",
        "test.Svc * work @default ask target=personal",
        "work",
        "",
        ask(1, ("personal",)),
    ),
    Case(
        "ask-nothing-to-offer",
        "test.Svc * work @default ask",
        "work",
        "",
        denied_at(1, "the line says ask, but there is no target to choose from"),
    ),
    Case(
        "ask-never-offers-the-caller",
        "test.Svc * work work ask",
        "work",
        "work",
        denied_at(1, "the line says ask, but there is no target to choose from"),
    ),
    Case(
        "ask-autostart-no-offers-running-only",
        "test.Svc * personal @anyvm ask autostart=no",
        "personal",
        "work",
        ask(1, ("untrusted", "work"), autostart=False),
    ),
    Case(
        "ask-user",
        "test.Svc * work vault ask user=alice notify=yes",
        "work",
        "vault",
        ask(1, ("vault",), user="alice", notify=True),
    ),
    # ---- requests that are not well formed
    Case(
        "target-with-a-path",
        "test.Svc * * * allow target=personal",
        "work",
        "../personal",
        refused("invalid target '../personal'"),
    ),
    Case(
        "target-with-a-space",
        "test.Svc * * * allow target=personal",
        "work",
        "personal ",
        refused("invalid target 'personal '"),
    ),
    Case(
        "target-token-that-names-many",
        "test.Svc * * * allow target=personal",
        "work",
        "@anyvm",
        refused("invalid target '@anyvm'"),
    ),
    Case(
        "service-with-a-path",
        "* * * * allow target=personal",
        "work",
        "personal",
        refused("invalid service name 'test.Svc/../x'"),
        call="test.Svc/../x",
    ),
    Case(
        "service-star",
        "* * * * allow target=personal",
        "work",
        "personal",
        refused("invalid service name '*'"),
        call="*",
    ),
    Case(
        "argument-with-a-space",
        "* * * * allow target=personal",
        "work",
        "personal",
        refused("invalid argument '+a b'"),
        call="test.Svc+a b",
    ),
    Case(
        "source-with-a-path",
        "* * * * allow target=personal",
        "../work",
        "personal",
        refused("invalid source '../work'"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_decision(case: Case) -> None:
    assert decide(case.policy, case.source, case.target, case.call) == case.expected


def test_case_ids_are_unique() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 40


def test_a_syntax_error_anywhere_denies_what_an_earlier_line_allows() -> None:
    text = "test.Svc * work personal allow\n# fine\ntest.Svc * work vault permit\n"
    assert decide(text, "work", "personal") == refused_with_rule(
        at(3),
        "the policy has 1 error, so every request is denied; first: "
        f"{at(3)}: unknown action 'permit'; use allow, deny or ask",
    )


def refused_with_rule(rule: str, reason: str) -> Decision:
    return Decision("deny", None, rule, None, reason=reason, notify=True)


# ---- answering a question -------------------------------------------------------------------


def test_an_answer_among_the_targets_offered_allows() -> None:
    question = decide("test.Svc * work @tag:trusted ask user=alice", "work", "vault")
    assert answer_ask(question, "vault") == Decision(
        "allow",
        "vault",
        at(1),
        "alice",
        reason=f"allowed by the user's answer to {at(1)}",
    )


def test_an_answer_not_offered_denies() -> None:
    question = decide("test.Svc * work @tag:trusted ask", "work", "vault")
    for answer in ("personal", "work", "@dispvm", "", "vault\n", "../vault"):
        assert answer_ask(question, answer) == Decision(
            "deny", None, at(1), None, reason=f"{answer!r} was not offered", notify=True
        )


def test_dom0_answers_for_the_host() -> None:
    question = decide("test.Svc * work * ask target=@adminvm", "work", "@adminvm")
    assert question.targets_for_ask == ("@adminvm",)
    assert answer_ask(question, "dom0").target == "@adminvm"


def test_only_a_question_can_be_answered() -> None:
    allowed = decide("test.Svc * work vault allow", "work", "vault")
    assert answer_ask(allowed, "vault") == Decision(
        "deny", None, at(1), None, reason="there was no question to answer", notify=True
    )
