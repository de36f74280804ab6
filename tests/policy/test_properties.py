"""Properties: random policies against a brute-force oracle; hostile requests never crash.

The oracle below is written apart from qnix.policy.evaluate, as plainly as possible: it works
on the raw strings of each line, and collects the targets of an `ask` per candidate target (the
first line that covers a candidate decides it) rather than with Qubes' backwards set updates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.policy.evaluate import evaluate
from qnix.policy.load import load_policy_files
from qnix.policy.parse import Policy
from tests.policy.helpers import SYSTEM

# ---- the world the oracle knows: the same system as tests.policy.helpers.SYSTEM -------------

HOST = "@adminvm"
NAMES = {"work", "personal", "vault", "untrusted", "dvm", "offline-dvm"}
TEMPLATES = {"dvm", "offline-dvm"}
TAGS = {
    "work": {"work", "trusted"},
    "vault": {"trusted"},
    "dvm": {"web"},
    "offline-dvm": {"offline"},
}
TYPES = {
    "work": "AppVM",
    "personal": "AppVM",
    "vault": "AppVM",
    "untrusted": "DispVM",
    "dvm": "DispVM",
    "offline-dvm": "DispVM",
    HOST: "AdminVM",
}
DEFAULT_DVM = {"work": "dvm", "personal": "dvm", "untrusted": "dvm", HOST: "dvm"}

SERVICES = ["svc.A", "svc.B", "*"]
ARGUMENTS = ["*", "*", "+", "+x"]
SOURCES = [
    "*", "@anyvm", "@adminvm", "dom0", "work", "personal", "vault", "untrusted", "ghost",
    "@tag:trusted", "@tag:work", "@type:AppVM", "@type:DispVM", "@type:AdminVM", "@dispvm:dvm",
    "@dispvm:@tag:web", "@default", "@dispvm",
]  # fmt: skip
TARGETS = [
    "*", "@anyvm", "@adminvm", "dom0", "@default", "@dispvm", "@dispvm:dvm",
    "@dispvm:offline-dvm", "@dispvm:ghost", "@dispvm:@tag:web", "@dispvm:@tag:offline",
    "@tag:trusted", "@tag:web", "@type:AppVM", "@type:DispVM", "@type:AdminVM", "work",
    "personal", "vault", "untrusted", "dvm", "ghost",
]  # fmt: skip
REDIRECTS = [
    None, None, None, "work", "personal", "vault", "@adminvm", "dom0", "@dispvm", "@dispvm:dvm",
    "@dispvm:offline-dvm", "ghost", "@dispvm:ghost",
]  # fmt: skip
REQUEST_SOURCES = ["work", "personal", "vault", "untrusted", "@adminvm", "dom0", "ghost"]
REQUEST_TARGETS = [
    "", "@default", "work", "personal", "vault", "untrusted", "dvm", "offline-dvm", "@adminvm",
    "dom0", "@dispvm", "@dispvm:dvm", "@dispvm:offline-dvm", "@dispvm:work", "ghost", "@anyvm",
    "../x",
]  # fmt: skip


@dataclass(frozen=True)
class Line:
    service: str
    argument: str
    source: str
    target: str
    action: str
    redirect: str | None
    user: str | None

    def text(self) -> str:
        params = []
        if self.action != "deny":
            params += [f"target={self.redirect}"] if self.redirect else []
            params += [f"user={self.user}"] if self.user else []
        return " ".join(
            [self.service, self.argument, self.source, self.target, self.action, *params]
        )

    def redirect_of(self) -> str | None:
        return self.redirect if self.action != "deny" else None

    def valid(self) -> bool:
        if self.source in ("@default", "@dispvm"):
            return False
        if self.service == "*" and self.argument != "*":
            return False
        return not (self.target == "@default" and self.action == "allow" and not self.redirect)


def template_of(target: str, source: str) -> str | None:
    if target.startswith("@dispvm:"):
        return target[len("@dispvm:") :]
    if target == "@dispvm":
        return DEFAULT_DVM.get(source)
    return None


def source_matches(token: str, source: str) -> bool:
    if token == "*":
        return True
    if token == "@anyvm":
        return source != HOST
    if token in ("@adminvm", "dom0"):
        return source == HOST
    if token.startswith("@tag:"):
        return token[5:] in TAGS.get(source, set())
    if token.startswith("@type:"):
        return TYPES.get(source) == token[6:]
    return token == source


def target_matches(token: str, target: str, source: str) -> bool:
    if token == "*":
        return True
    if token == "@anyvm":
        return target != HOST
    if token in ("@adminvm", "dom0"):
        return target == HOST
    if token in ("@default", "@dispvm"):
        return target == token
    if token.startswith("@dispvm:@tag:"):
        template = template_of(target, source)
        return template in TEMPLATES and token[13:] in TAGS.get(template or "", set())
    if token.startswith("@dispvm:"):
        return template_of(target, source) == token[8:]
    if token.startswith("@tag:"):
        return target in NAMES and token[5:] in TAGS.get(target, set())
    if token.startswith("@type:"):
        return TYPES.get(target) == token[6:]
    return target == token


def covers(token: str, candidate: str) -> bool:
    """Whether a question could list `candidate` for a line with this target."""
    if token == "*":
        return True
    if token == "@anyvm":
        return candidate != HOST
    if token in ("@adminvm", "dom0"):
        return candidate == HOST
    if token == "@default":
        return False
    if token == "@dispvm":
        return candidate == "@dispvm"
    if token.startswith("@dispvm:@tag:"):
        template = candidate[len("@dispvm:") :]
        return candidate.startswith("@dispvm:") and token[13:] in TAGS.get(template, set())
    if token.startswith("@dispvm:"):
        return candidate == token and token[8:] in TEMPLATES
    if token.startswith("@tag:"):
        return candidate in NAMES and token[5:] in TAGS.get(candidate, set())
    if token.startswith("@type:"):
        return TYPES.get(candidate) == token[6:]
    return candidate == token and token in NAMES


def resolve(target: str, source: str) -> str | None:
    if target in ("@adminvm", "dom0"):
        return HOST
    if target == "@dispvm":
        return "@dispvm:" + DEFAULT_DVM[source] if source in DEFAULT_DVM else None
    if target.startswith("@dispvm:"):
        return target if target[8:] in TEMPLATES else None
    return target if target in NAMES else None


def requested(target: str) -> str | None:
    """The request's target as the policy sees it; None for one that is denied outright."""
    if target in ("", "@default"):
        return "@default"
    if target in ("@adminvm", "dom0"):
        return HOST
    if target == "@dispvm":
        return target
    if target.startswith("@dispvm:"):
        return target if target[8:] in TEMPLATES else None
    if re.fullmatch(r"[a-z][a-z0-9-]{0,30}", target):
        return target if target in NAMES else "@default"
    return None


Outcome = tuple[str, str | None, str | None, str | None, tuple[str, ...]]


def oracle(lines: list[Line], service: str, argument: str, source: str, target: str) -> Outcome:
    """(action, target, rule, user, targets offered) by brute force."""
    if not all(line.valid() for line in lines):
        first_bad = next(i for i, line in enumerate(lines, 1) if not line.valid())
        return ("deny", None, f"p.policy:{first_bad}", None, ())
    argument = argument or "+"
    source = HOST if source == "dom0" else source
    wanted = requested(target)
    if wanted is None:
        return ("deny", None, None, None, ())
    candidates = [
        line
        for line in lines
        if line.service in ("*", service)
        and line.argument in ("*", argument)
        and source_matches(line.source, source)
    ]
    for number, line in enumerate(lines, 1):
        if line not in candidates or not target_matches(line.target, wanted, source):
            continue
        rule = f"p.policy:{number}"
        if line.action == "deny":
            return ("deny", None, rule, None, ())
        if line.action == "allow":
            destination = resolve(line.redirect or wanted, source)
            if destination is None or destination == source:
                return ("deny", None, rule, None, ())
            return ("allow", destination, rule, line.user, ())
        if line.redirect:
            offered = {resolve(line.redirect, source)} - {None}
        else:
            offered = set()
            everything = {*NAMES, HOST, "@dispvm", *("@dispvm:" + t for t in TEMPLATES)}
            for candidate in everything:
                for earlier in candidates:
                    if covers(earlier.redirect_of() or earlier.target, candidate):
                        if earlier.action != "deny":
                            offered.add(candidate)
                        break
            if "@dispvm" in offered:
                offered.remove("@dispvm")
                if source in DEFAULT_DVM:
                    offered.add("@dispvm:" + DEFAULT_DVM[source])
        offered.discard(source)
        if not offered:
            return ("deny", None, rule, None, ())
        return ("ask", None, rule, line.user, tuple(sorted(str(t) for t in offered)))
    return ("deny", None, None, None, ())


def either(aligned: str, others: list[str]) -> st.SearchStrategy[str]:
    """Half the time the request's own value, so that lines match and decide."""
    return st.one_of(st.just(aligned), st.sampled_from(others))


Request = tuple[str, str, str, str]


@st.composite
def policies_and_requests(draw: st.DrawFn) -> tuple[list[Line], Request]:
    """A request, and a policy whose lines often name its own service, source and target.
    One policy in six has one invalid line somewhere."""
    service = draw(st.sampled_from(["svc.A", "svc.B"]))
    argument = draw(st.sampled_from(["", "+", "+x", "+y"]))
    source = draw(st.sampled_from(REQUEST_SOURCES))
    target = draw(st.sampled_from(REQUEST_TARGETS))
    line = st.builds(
        Line,
        either(service, SERVICES),
        either("*", ARGUMENTS),
        either(source, SOURCES),
        either(target, TARGETS) if target in TARGETS else st.sampled_from(TARGETS),
        st.sampled_from(["allow", "deny", "ask"]),
        st.sampled_from(REDIRECTS),
        st.sampled_from([None, None, "alice"]),
    )
    lines = [repaired(drawn) for drawn in draw(st.lists(line, max_size=8))]
    if draw(st.sampled_from([False, False, False, False, False, True])):
        bad = broken(draw(line), draw(st.integers(0, 2)))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    return lines, (service, argument, source, target)


def repaired(line: Line) -> Line:
    """A valid line like this one (cheaper for hypothesis than filtering)."""
    if line.source in ("@default", "@dispvm"):
        line = replace(line, source="*")
    if line.service == "*":
        line = replace(line, argument="*")
    if line.target == "@default" and line.action == "allow" and not line.redirect:
        line = replace(line, redirect="personal")
    return line


def broken(line: Line, how: int) -> Line:
    """An invalid line: @default as a source, an argument for any service, or a bare
    allow to @default."""
    if how == 0:
        return replace(line, source="@default")
    if how == 1:
        return replace(line, service="*", argument="+x")
    return replace(line, target="@default", action="allow", redirect=None)


def load(lines: list[Line]) -> Policy:
    return load_policy_files({"p.policy": "".join(line.text() + "\n" for line in lines)})


@settings(max_examples=1000, deadline=None)
@given(case=policies_and_requests())
def test_evaluation_agrees_with_the_oracle(case: tuple[list[Line], Request]) -> None:
    lines, (service, argument, source, target) = case
    policy = load(lines)
    assert bool(policy.errors) == (not all(line.valid() for line in lines))
    decision = evaluate(
        policy,
        SYSTEM,
        untrusted_service=service,
        untrusted_argument=argument,
        source=source,
        untrusted_target=target,
    )
    got = (
        decision.action,
        decision.target,
        decision.rule,
        decision.user,
        decision.targets_for_ask,
    )
    assert got == oracle(lines, service, argument, source, target)
    if decision.action == "allow":
        # Never an allow without a matching allow line, and it is the first matching line.
        assert decision.rule is not None
        line = lines[int(decision.rule.rsplit(":", 1)[1]) - 1]
        assert line.action == "allow"
        assert line.service in ("*", service) and line.argument in ("*", argument or "+")
        normalised_source = HOST if source == "dom0" else source
        assert source_matches(line.source, normalised_source)
        assert target_matches(line.target, requested(target) or "", normalised_source)


# ---- hostile requests -----------------------------------------------------------------------

PERMISSIVE = load_policy_files({"p.policy": "* * * * allow target=personal\n"})
HOSTILE = [
    "../",
    "../personal",
    "personal/../vault",
    "a b",
    " personal",
    "personal\n",
    "personal\x00",
    "\x00",
    "x" * 100_000,
    "@dispvm:../dvm",
    "@dispvm:",
    "@tag:trusted",
    "@anyvm",
    "*",
    "\u202epersonal",
    "ｐersonal",
    "personal;id",
    "$(id)",
]
hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=80), st.binary().map(repr))


def well_formed_target(target: str) -> bool:
    return requested(target) is not None and (target not in ("", "@default"))


@settings(max_examples=300, deadline=None)
@given(service=hostile_text, argument=hostile_text, target=hostile_text)
def test_hostile_strings_never_crash_and_are_only_allowed_when_well_formed(
    service: str, argument: str, target: str
) -> None:
    decision = evaluate(
        PERMISSIVE,
        SYSTEM,
        untrusted_service=service,
        untrusted_argument=argument,
        source="work",
        untrusted_target=target,
    )
    well_formed = (
        re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", service) is not None
        and re.fullmatch(r"(\+[A-Za-z0-9_.+-]{0,64})?", argument) is not None
        and requested(target) is not None
    )
    assert (decision.action == "allow") == well_formed
    if not well_formed:
        assert (decision.rule, decision.target) == (None, None)


def test_each_hostile_string_is_denied_in_every_place() -> None:
    for bad in HOSTILE:
        for place in ("untrusted_service", "untrusted_argument", "source", "untrusted_target"):
            request = {
                "untrusted_service": "svc.A",
                "untrusted_argument": "+x",
                "source": "work",
                "untrusted_target": "personal",
                place: bad,
            }
            decision = evaluate(PERMISSIVE, SYSTEM, **request)
            assert decision.action == "deny", (place, bad)
            assert decision.reason.startswith("invalid") or "disposable template" in decision.reason
            assert len(decision.reason) < 200


# ---- random policy text ---------------------------------------------------------------------

FILE_NAMES = ["10-a.policy", "20-b.policy", "Bad.policy", "inc/x", "inc/y.policy", "s", "a/b/c"]
LINE_PIECES = [
    "!include inc/x",
    "!include 10-a.policy",
    "!include-dir inc",
    "!include-dir .",
    "!include-service svc.A * s",
    "!include-service * +x s",
    "!include ../x",
    "!include /etc/passwd",
    "!bogus",
    "$include:inc/x",
    "* * * * allow",
    "svc.A * work @anyvm ask default_target=@dispvm",
    "work personal allow,target=vault",
    "$anyvm $anyvm deny",
]
file_text = st.lists(st.one_of(st.sampled_from(LINE_PIECES), st.text(max_size=40)), max_size=6).map(
    "\n".join
)


@settings(max_examples=200, deadline=None)
@given(files=st.dictionaries(st.sampled_from(FILE_NAMES), file_text, max_size=5))
def test_reading_any_files_never_raises_and_errors_deny(files: dict[str, str]) -> None:
    policy = load_policy_files(files)
    decision = evaluate(
        policy,
        SYSTEM,
        untrusted_service="svc.A",
        untrusted_argument="",
        source="work",
        untrusted_target="personal",
    )
    if policy.errors:
        assert decision.action == "deny"
        assert decision.rule == policy.errors[0].where
    for error in policy.errors:
        assert error.render().isprintable()
