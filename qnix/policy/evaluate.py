"""Decide one request under a policy, as Qubes 4.1+ qrexec does. Pure: no files, no processes.

The caller passes an explicit snapshot of the system (`System`): which compartments exist,
their tags and types, which are disposable templates, which run. Semantics, as in Qubes:

* the first line matching service, argument, source and target decides; none denies;
* `@anyvm` is every compartment but not the host (`@adminvm`), and matches requests for
  `@default` and `@dispvm` too; `*` matches everything, the host included;
* a requested target that names no compartment is `@default`; one that is not even a valid
  name or token is denied (Qubes would treat it as `@default`: a caller sending `../x` or a
  name with a space is up to no good);
* `@dispvm` is the caller's default disposable template; a `target=` redirect is used as is,
  without matching the policy again;
* `allow` needs a target in the end (`@default` alone denies); a call to oneself is denied;
* for `ask`, the targets offered are collected over every line for this service, argument and
  source, as Qubes does: allow and ask lines add what their target covers, deny lines remove
  it, earlier lines win; the caller itself is never offered. The answer must be one of them
  (`answer_ask`).

Values a compartment sends (service, argument, requested target) are named `untrusted_*`
until checked. Every error path denies; a policy with a syntax error denies everything.
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qnix.policy.parse import Action, Policy, Rule, Token, parse_token
from qnix.spec.model import COMPARTMENT_NAME_RE, Workstation

HOST = "@adminvm"
HOST_ALIASES = (HOST, "dom0")
DISPVM_PREFIX = "@dispvm:"
REQUEST_SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
REQUEST_ARGUMENT_RE = re.compile(r"\+[A-Za-z0-9_.+-]{0,64}")

DomainType = Literal["AppVM", "DispVM", "AdminVM", "TemplateVM", "StandaloneVM"]


@dataclass(frozen=True, slots=True)
class Domain:
    """What the policy may ask about one compartment (Qubes' system_info entry)."""

    type: DomainType = "AppVM"
    tags: frozenset[str] = frozenset()
    # A disposable template: `@dispvm:NAME` makes a fresh disposable from it.
    template_for_dispvms: bool = False
    # The template `@dispvm` means when this compartment calls.
    default_dispvm: str | None = None
    # Whether it runs now: `autostart=no` allows only running targets.
    running: bool = False


def _frozen(mapping: Mapping[str, Domain]) -> Mapping[str, Domain]:
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class System:
    """The compartments by name, and the host (`@adminvm`, also written `dom0`)."""

    compartments: Mapping[str, Domain] = field(default_factory=dict)
    host: Domain = Domain(type="AdminVM", running=True)

    def __post_init__(self) -> None:
        for name in self.compartments:
            if not re.fullmatch(COMPARTMENT_NAME_RE, name) or name in HOST_ALIASES:
                raise ValueError(f"{name!r} is not a compartment name")
        object.__setattr__(self, "compartments", _frozen(self.compartments))

    def get(self, name: str) -> Domain | None:
        return self.host if name == HOST else self.compartments.get(name)

    def is_template(self, name: str | None) -> bool:
        domain = self.compartments.get(name) if name is not None else None
        return domain is not None and domain.template_for_dispvms

    def default_dispvm(self, source: str) -> str | None:
        """The template `@dispvm` means for this caller, if it has a usable one."""
        domain = self.get(source)
        template = domain.default_dispvm if domain is not None else None
        return template if self.is_template(template) else None


def system_from_workstation(ws: Workstation, *, running: Collection[str] = ()) -> System:
    """The spec's compartments as the policy sees them.

    A persistent compartment is an AppVM, a disposable one a DispVM; a disposable template is
    a DispVM that is a template for disposables (it stands for the disposables made from it,
    as in the graph). `@dispvm` means the spec's default_disposable for every caller.
    """
    default = ws.default_disposable
    domains = {
        name: Domain(
            type="AppVM" if compartment.persistence == "persistent" else "DispVM",
            tags=frozenset(compartment.tags),
            default_dispvm=default,
            running=name in running,
        )
        for name, compartment in ws.compartments.items()
    }
    for name, template in ws.disposable_templates.items():
        domains[name] = Domain(
            type="DispVM",
            tags=frozenset(template.tags),
            template_for_dispvms=True,
            default_dispvm=default,
        )
    return System(domains, Domain(type="AdminVM", default_dispvm=default, running=True))


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request, and why.

    `target` is where an allowed call goes (`@dispvm:TEMPLATE` for a new disposable), or for
    `ask` the target the question preselects; `rule` is the deciding line as FILE:LINE (for a
    broken policy: where its first error is).
    """

    action: Action
    target: str | None
    rule: str | None
    user: str | None
    targets_for_ask: tuple[str, ...] = ()
    default_target: str | None = None
    reason: str = ""
    notify: bool = False
    autostart: bool = True

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "rule": self.rule, "user": self.user}


def _deny(reason: str, rule: str | None = None, *, notify: bool = True) -> Decision:
    return Decision("deny", None, rule, None, reason=reason, notify=notify)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: `target` is a name of the system, @adminvm, @default, @dispvm or
    @dispvm:TEMPLATE."""

    service: str
    argument: str
    source: str
    target: Token


class Denied(Exception):
    """Raised inside evaluation; `evaluate` turns it into a deny decision."""


def check_request(
    system: System,
    *,
    untrusted_service: str,
    untrusted_argument: str,
    source: str,
    untrusted_target: str,
) -> Request:
    """The request in checked form; Denied says what is wrong with it."""
    if not REQUEST_SERVICE_RE.fullmatch(untrusted_service):
        raise Denied(f"invalid service name {_shown(untrusted_service)}")
    service = untrusted_service
    if untrusted_argument in ("", "+"):
        argument = "+"
    elif REQUEST_ARGUMENT_RE.fullmatch(untrusted_argument):
        argument = untrusted_argument
    else:
        raise Denied(f"invalid argument {_shown(untrusted_argument)}")
    if source in HOST_ALIASES:
        caller = HOST
    elif re.fullmatch(COMPARTMENT_NAME_RE, source):
        caller = source
    else:
        raise Denied(f"invalid source {_shown(source)}")
    return Request(service, argument, caller, _requested_target(system, untrusted_target))


def _requested_target(system: System, untrusted_target: str) -> Token:
    """What the caller asked for, as Qubes' IntendedTarget.verify sees it."""
    if untrusted_target in ("", "@default"):
        return Token("default")
    if untrusted_target in HOST_ALIASES:
        return Token("adminvm")
    if untrusted_target == "@dispvm":
        return Token("dispvm")
    if untrusted_target.startswith(DISPVM_PREFIX):
        template = untrusted_target[len(DISPVM_PREFIX) :]
        if re.fullmatch(COMPARTMENT_NAME_RE, template) and system.is_template(template):
            return Token("dispvm_template", template)
        raise Denied(f"{_shown(untrusted_target)} names no disposable template")
    if re.fullmatch(COMPARTMENT_NAME_RE, untrusted_target):
        if untrusted_target in system.compartments:
            return Token("name", untrusted_target)
        return Token("default")  # Qubes: a target that does not exist is @default
    raise Denied(f"invalid target {_shown(untrusted_target)}")


def _shown(untrusted: str) -> str:
    """An untrusted value for a message: quoted, escaped, cut short."""
    text = repr(untrusted[:64])
    return text + ("..." if len(untrusted) > 64 else "")


# ---- matching -------------------------------------------------------------------------------


def source_matches(token: Token, source: str, system: System) -> bool:
    domain = system.get(source)
    match token.kind:
        case "any":
            return True
        case "anyvm":
            return source != HOST
        case "adminvm":
            return source == HOST
        case "name":
            return token.value == source
        case "tag":
            return domain is not None and token.value in domain.tags
        case "type":
            return domain is not None and domain.type == token.value
        case _:
            # `@dispvm:...` as a source matches no caller in Qubes either: a caller is always
            # a named compartment, never a template token.
            return False


def _template_of(target: Token, source: str, system: System) -> str | None:
    """The disposable template a requested `@dispvm` or `@dispvm:T` stands for."""
    if target.kind == "dispvm_template":
        return target.value
    if target.kind == "dispvm":
        return system.default_dispvm(source)
    return None


def target_matches(token: Token, target: Token, source: str, system: System) -> bool:
    """Whether a line's target column covers the (checked) requested target."""
    domain = system.get(target.value) if target.kind == "name" else None
    match token.kind:
        case "any":
            return True
        case "anyvm":
            return target.kind != "adminvm"
        case "adminvm" | "default" | "dispvm":
            return target.kind == token.kind
        case "name":
            return target.kind == "name" and target.value == token.value
        case "tag":
            return domain is not None and token.value in domain.tags
        case "type":
            if target.kind == "adminvm":
                return token.value == system.host.type
            return domain is not None and domain.type == token.value
        case "dispvm_template":
            return _template_of(target, source, system) == token.value
        case "dispvm_tag":
            template = _template_of(target, source, system)
            holder = system.compartments.get(template) if template is not None else None
            return holder is not None and holder.template_for_dispvms and token.value in holder.tags
    return False


def _matches_but_target(rule: Rule, request: Request, system: System) -> bool:
    return (
        rule.service in ("*", request.service)
        and rule.argument in ("*", request.argument)
        and source_matches(rule.source, request.source, system)
    )


def matching_rule(policy: Policy, request: Request, system: System) -> Rule | None:
    """The first line that matches the request: the one that decides."""
    for rule in policy.rules:
        if _matches_but_target(rule, request, system) and target_matches(
            rule.target, request.target, request.source, system
        ):
            return rule
    return None


# ---- ask: the targets to offer --------------------------------------------------------------


def expand(token: Token, system: System) -> set[str]:
    """Every target a line's target (or redirect) stands for, as the question would list it."""
    names = system.compartments
    templates = {DISPVM_PREFIX + n for n, d in names.items() if d.template_for_dispvms}
    match token.kind:
        case "any":
            return {*names, HOST, *templates, "@dispvm"}
        case "anyvm":
            return {*names, *templates, "@dispvm"}
        case "adminvm":
            return {HOST}
        case "name":
            return {token.value} & names.keys()
        case "tag":
            return {n for n, d in names.items() if token.value in d.tags}
        case "type":
            found = {n for n, d in names.items() if d.type == token.value}
            return found | ({HOST} if system.host.type == token.value else set())
        case "dispvm":
            return {"@dispvm"}
        case "dispvm_template":
            return {DISPVM_PREFIX + token.value} & templates
        case "dispvm_tag":
            return {
                DISPVM_PREFIX + n
                for n, d in names.items()
                if d.template_for_dispvms and token.value in d.tags
            }
    return set()  # @default offers nothing


def collect_targets_for_ask(policy: Policy, request: Request, system: System) -> set[str]:
    """Qubes' collect_targets_for_ask: walk the lines backwards so that earlier lines win."""
    targets: set[str] = set()
    for rule in reversed(policy.rules):
        if not _matches_but_target(rule, request, system):
            continue
        redirect = rule.param("target") if rule.action != "deny" else None
        token = parse_token(redirect, as_target=True) if redirect else rule.target
        covered = expand(token, system)
        if rule.action == "deny":
            targets -= covered
        else:
            targets |= covered
    if "@dispvm" in targets:
        targets.discard("@dispvm")
        template = system.default_dispvm(request.source)
        if template is not None:
            targets.add(DISPVM_PREFIX + template)
    targets.discard(request.source)
    return targets


# ---- actions --------------------------------------------------------------------------------


def _resolve(token: Token, request: Request, system: System) -> str:
    """One concrete place (a name, @adminvm or @dispvm:TEMPLATE) for a target or redirect."""
    match token.kind:
        case "adminvm":
            return HOST
        case "name":
            if token.value not in system.compartments:
                raise Denied(f"target {token.value!r} does not exist")
            return token.value
        case "dispvm":
            template = system.default_dispvm(request.source)
            if template is None:
                raise Denied(f"{request.source} has no default disposable template for @dispvm")
            return DISPVM_PREFIX + template
        case "dispvm_template":
            if not system.is_template(token.value):
                raise Denied(f"{token.value!r} is not a disposable template")
            return DISPVM_PREFIX + token.value
    raise Denied("neither the caller nor the policy names a target (@default)")


def _can_skip_autostart(target: str, system: System) -> bool:
    """Whether a target is there without starting anything (for `autostart=no`)."""
    if target.startswith(DISPVM_PREFIX):
        return False  # a disposable is always new
    domain = system.get(target)
    return domain is not None and domain.running


def _flag(rule: Rule, key: str, default: bool) -> bool:
    value = rule.param(key)
    return default if value is None else value == "yes"


def _allow(rule: Rule, request: Request, system: System) -> Decision:
    redirect = rule.param("target")
    token = parse_token(redirect, as_target=True) if redirect else request.target
    target = _resolve(token, request, system)
    notify = _flag(rule, "notify", False)
    autostart = _flag(rule, "autostart", True)
    if not autostart and not _can_skip_autostart(target, system):
        raise Denied(f"{target} is not running and the line says autostart=no")
    if target == request.source:
        raise Denied("a call to oneself is denied")
    how = f" (redirected by target={redirect})" if redirect else ""
    return Decision(
        "allow",
        target,
        rule.where,
        rule.param("user"),
        reason=f"allowed by {rule.where}{how}",
        notify=notify,
        autostart=autostart,
    )


def _ask(policy: Policy, rule: Rule, request: Request, system: System) -> Decision:
    redirect = rule.param("target")
    autostart = _flag(rule, "autostart", True)
    if redirect:
        try:
            offered = {_resolve(parse_token(redirect, as_target=True), request, system)}
        except Denied:
            offered = set()
    else:
        offered = collect_targets_for_ask(policy, request, system)
    if not autostart:
        offered = {t for t in offered if _can_skip_autostart(t, system)}
    offered.discard(request.source)
    if not offered:
        raise Denied("the line says ask, but there is no target to choose from")
    default = rule.param("default_target")
    preselected: str | None = None
    if default:
        try:
            preselected = _resolve(parse_token(default, as_target=True), request, system)
        except Denied:
            preselected = None
        if preselected not in offered:
            preselected = None  # as Qubes: a default that is not on offer is dropped
    targets = tuple(sorted(offered, key=lambda t: t.encode()))
    return Decision(
        "ask",
        preselected,
        rule.where,
        rule.param("user"),
        targets_for_ask=targets,
        default_target=preselected,
        reason=f"ask by {rule.where}: choose one of {', '.join(targets)}",
        notify=_flag(rule, "notify", False),
        autostart=autostart,
    )


def evaluate(
    policy: Policy,
    system: System,
    *,
    untrusted_service: str,
    untrusted_argument: str,
    source: str,
    untrusted_target: str,
) -> Decision:
    """Decide one request. Never raises for any strings; every problem denies."""
    if policy.errors:
        first = policy.errors[0]
        count = len(policy.errors)
        return _deny(
            f"the policy has {count} error{'s' if count != 1 else ''}, so every request is "
            f"denied; first: {first.render()}",
            first.where,
        )
    try:
        request = check_request(
            system,
            untrusted_service=untrusted_service,
            untrusted_argument=untrusted_argument,
            source=source,
            untrusted_target=untrusted_target,
        )
    except Denied as exc:
        return _deny(str(exc))
    rule = matching_rule(policy, request, system)
    if rule is None:
        return _deny("no policy line matches")
    try:
        if rule.action == "allow":
            return _allow(rule, request, system)
        if rule.action == "ask":
            return _ask(policy, rule, request, system)
    except Denied as exc:
        return _deny(f"{rule.where}: {exc}", rule.where, notify=_flag(rule, "notify", True))
    return _deny(f"denied by {rule.where}", rule.where, notify=_flag(rule, "notify", True))


def answer_ask(decision: Decision, untrusted_choice: str) -> Decision:
    """The user's answer to an `ask`: allowed only for one of the targets offered."""
    if decision.action != "ask":
        return _deny("there was no question to answer", decision.rule)
    choice = HOST if untrusted_choice in HOST_ALIASES else untrusted_choice
    if choice not in decision.targets_for_ask:
        return _deny(f"{_shown(untrusted_choice)} was not offered", decision.rule)
    return Decision(
        "allow",
        choice,
        decision.rule,
        decision.user,
        reason=f"allowed by the user's answer to {decision.rule}",
        notify=decision.notify,
        autostart=decision.autostart,
    )
