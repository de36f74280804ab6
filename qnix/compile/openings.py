"""Compartment-to-compartment openings from the policy's `qnix.Net` lines. Pure.

    qnix.Net  +tcp+8080  work  printer  allow

lets `work` open TCP connections to port 8080 of `printer`; nothing else between them changes.
The argument is `+tcp+PORT` or `+udp+PORT` with PORT 1 to 65535 written without leading zeros:
one spelling per port, so that a deny line for a port always covers every allow line for it.
(`+` separates the parts, as in Qubes' own `qubes.ConnectTCP +HOST+PORT`: `:` is not a character
a Qubes policy argument may hold.) Any other argument on a `qnix.Net` line is a policy error at
its file:line, and a policy with one opens nothing.

Which pairs open is decided by the policy engine itself (`qnix.policy.evaluate`), so it is what
`qnix policy check qnix.Net+tcp+8080 work printer --spec SPEC` says: every `qnix.Net` allow line
with a port proposes the pairs its source and target cover, and a pair opens only if the FIRST
line matching (qnix.Net, argument, source, target) allows it, untouched by a `target=` redirect.

What never opens, with a warning where a line says so explicitly:

* `ask`: a packet cannot wait for an answer, so an ask line opens nothing;
* the host (`@adminvm`, `dom0`): the table drops everything a compartment sends to the host;
* disposables made from a template (`@dispvm`, `@dispvm:NAME`, a template's name): they get
  their address when they start, so there is nothing to compile an element from;
* compartments with `network = "none"`: they have no link;
* a `qnix.Net` line with the argument `*`, since it names no port.

The result is a list of `Opening`s by compartment name; `qnix.compile.nft` turns them into the
elements of the table's `openings` set (source address . destination address . protocol . port)
with the link addresses of `names.allocate_links`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qnix.errors import Problem, SpecError
from qnix.policy.evaluate import (
    HOST,
    System,
    evaluate,
    source_matches,
    system_from_workstation,
    target_matches,
)
from qnix.policy.load import load_policy_files
from qnix.policy.parse import INLINE_POLICY_FILE, Policy, PolicyError, Rule, Token
from qnix.spec.model import NETWORK_NONE, Workstation

if TYPE_CHECKING:
    from qnix.spec.load import LoadedSpec

SERVICE = "qnix.Net"
ARGUMENT_RE = re.compile(r"\+(tcp|udp)\+([1-9][0-9]{0,4})")
MAX_PORT = 65535
_DISPOSABLE_TOKENS = ("dispvm", "dispvm_template", "dispvm_tag")

Proto = Literal["tcp", "udp"]


@dataclass(frozen=True, slots=True, order=True)
class Opening:
    """`source` may open `proto` connections to `port` of `target`; `rule` (FILE:LINE) is the
    policy line that decided it."""

    source: str
    target: str
    proto: Proto
    port: int
    rule: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class CompiledOpenings:
    """The openings, and what the author should hear: `errors` (then `openings` is empty: a
    policy with an error opens nothing) and `warnings` (lines that open less than they say)."""

    openings: tuple[Opening, ...]
    errors: tuple[PolicyError, ...] = ()
    warnings: tuple[PolicyError, ...] = ()


def parse_argument(argument: str) -> tuple[Proto, int] | None:
    """(proto, port) of a `qnix.Net` argument, or None if it is not one."""
    match = ARGUMENT_RE.fullmatch(argument)
    if match is None or int(match.group(2)) > MAX_PORT:
        return None
    proto: Proto = "tcp" if match.group(1) == "tcp" else "udp"
    return proto, int(match.group(2))


def argument_problem(rule: Rule) -> str:
    """What is wrong with a `qnix.Net` line's argument ("" if nothing, or not such a line)."""
    if rule.service != SERVICE or rule.argument == "*" or parse_argument(rule.argument):
        return ""
    return (
        f"bad {SERVICE} argument {rule.argument!r}: use +tcp+PORT or +udp+PORT, "
        f"PORT 1 to {MAX_PORT} without leading zeros"
    )


def _networked(ws: Workstation) -> list[str]:
    return sorted(name for name, c in ws.compartments.items() if c.network != NETWORK_NONE)


def _warnings_for(rule: Rule, ws: Workstation) -> list[str]:
    """What a `qnix.Net` line says that cannot become an opening."""
    found: list[str] = []
    if rule.action == "ask":
        found.append(
            f"ask opens nothing for {SERVICE}: no one can be asked when a packet arrives; use allow"
        )
    if rule.action != "deny" and rule.argument == "*":
        found.append(
            f"{SERVICE} with the argument * opens nothing; name one port: +tcp+PORT or +udp+PORT"
        )
    if rule.action == "allow" and rule.param("target") is not None:
        found.append("target= cannot redirect packets; this line opens nothing")
    if rule.action == "allow" and rule.param("autostart") == "no":
        found.append("autostart=no: nothing runs at build time, so this line opens nothing")
    if rule.action == "deny":
        return found
    for role, token in (("source", rule.source), ("target", rule.target)):
        if token.kind == "adminvm":
            found.append(
                f"the host ({HOST}) is never reachable over the compartments' links; "
                f"nothing opens for the {role} {token}"
            )
        elif token.kind in _DISPOSABLE_TOKENS or (
            token.kind == "name" and token.value in ws.disposable_templates
        ):
            found.append(
                "disposables get their address when they start; openings to or from them "
                f"are not supported, the {role} {token} is skipped"
            )
        elif (
            token.kind == "name"
            and token.value in ws.compartments
            and ws.compartments[token.value].network == NETWORK_NONE
        ):
            found.append(f'{token.value} has no network (network = "none"); nothing opens for it')
    return found


def _covered(rule: Rule, system: System, networked: Sequence[str]) -> list[tuple[str, str]]:
    """The (source, target) pairs of compartments with a link that a line's columns cover."""
    sources = [name for name in networked if source_matches(rule.source, name, system)]
    return [
        (source, target)
        for source in sources
        for target in networked
        if target != source and target_matches(rule.target, Token("name", target), source, system)
    ]


def compile_openings(ws: Workstation, policy: Policy, system: System) -> CompiledOpenings:
    """Every pair (and port) the policy opens between compartments of `ws` with a network."""
    errors = list(policy.errors)
    for rule in policy.rules:
        problem = argument_problem(rule)
        if problem:
            errors.append(PolicyError(rule.file, rule.line, problem))
    warnings: list[PolicyError] = []
    networked = _networked(ws)
    decided: dict[tuple[str, str, str], Opening | None] = {}
    for rule in policy.rules:
        if rule.service != SERVICE:
            continue
        said = _warnings_for(rule, ws)
        warnings += [PolicyError(rule.file, rule.line, message) for message in said]
        parsed = parse_argument(rule.argument)
        if errors or parsed is None or rule.action != "allow":
            continue
        proto, port = parsed
        covered = _covered(rule, system, networked)
        for source, target in covered:
            key = (rule.argument, source, target)
            if key in decided:
                continue
            decision = evaluate(
                policy,
                system,
                untrusted_service=SERVICE,
                untrusted_argument=rule.argument,
                source=source,
                untrusted_target=target,
            )
            opened = decision.action == "allow" and decision.target == target
            decided[key] = (
                Opening(source, target, proto, port, decision.rule or "") if opened else None
            )
        if said:
            continue  # the line has been warned about already
        if not covered:
            message = "covers no pair of compartments with a network; it opens nothing"
            warnings.append(PolicyError(rule.file, rule.line, message))
        elif not any(o is not None and o.rule == rule.where for o in decided.values()):
            message = "opens nothing: earlier lines decide every pair it covers"
            warnings.append(PolicyError(rule.file, rule.line, message))
    if errors:
        return CompiledOpenings((), tuple(errors), tuple(warnings))
    openings = sorted(o for o in decided.values() if o is not None)
    return CompiledOpenings(tuple(openings), (), tuple(warnings))


def spec_policy(loaded: LoadedSpec) -> Policy:
    """The policy a build ships: the spec's inline rules, then its policy.d files as read."""
    return load_policy_files(
        dict(loaded.policy_files), inline_rules=loaded.workstation.policy.rules
    )


def for_spec(loaded: LoadedSpec) -> CompiledOpenings:
    """The openings of a spec; a policy error becomes a SpecError naming its file:line."""
    ws = loaded.workstation
    compiled = compile_openings(ws, spec_policy(loaded), system_from_workstation(ws))
    if compiled.errors:
        raise SpecError([_problem(str(loaded.path), error) for error in compiled.errors])
    return compiled


def _problem(spec_file: str, error: PolicyError) -> Problem:
    """A policy error where the author finds it: an inline rule by its key path, a policy.d
    file's line by file:line."""
    if error.file == INLINE_POLICY_FILE and error.line > 0:
        return Problem(spec_file, f"policy.rules[{error.line - 1}]", error.message)
    return Problem(spec_file, "policy.dir", f"{error.render()}")
