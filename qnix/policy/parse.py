"""Qubes 4.1+ policy.d lines as typed tokens.

A line is `service argument source target action [key=value ...]`, where argument is `*` or
`+ARG`. Sources and targets are typed tokens (`@anyvm`, `@tag:NAME`, a compartment name, ...)
so that later code matches on types, never on raw strings. Any syntax error is an error with
file:line: the caller must deny everything while a policy has one.

Include directives (`!include`, `!include-dir`, `!include-service`) need files to read, so
they are handled by `qnix.policy.load`; `parse_line` refuses them, which is what the spec's
inline rules need.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qnix.spec.model import COMPARTMENT_NAME_RE, TAG_RE, UNIX_USER_RE

# The spec's inline rules form this file, so that in name order they come first.
INLINE_POLICY_FILE = "00-spec.policy"
SERVICE_RE = re.compile(r"^(\*|[A-Za-z0-9_.-]{1,64})$")
ARGUMENT_RE = re.compile(r"^(\*|\+[A-Za-z0-9_.+-]{0,64})$")
VM_TYPES = ("AppVM", "DispVM", "AdminVM", "TemplateVM", "StandaloneVM")
ACTIONS = ("allow", "deny", "ask")
PARAMS: dict[str, tuple[str, ...]] = {
    "allow": ("target", "user", "notify", "autostart"),
    "deny": ("notify",),
    "ask": ("target", "default_target", "user", "notify", "autostart"),
}

TokenKind = Literal[
    "name",
    "anyvm",
    "adminvm",
    "default",
    "dispvm",
    "dispvm_template",
    "dispvm_tag",
    "tag",
    "type",
    "any",
]
Action = Literal["allow", "deny", "ask"]


class PolicySyntaxError(ValueError):
    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class Token:
    """A source or target: its kind and, for named kinds, the name it carries."""

    kind: TokenKind
    value: str = ""

    def __str__(self) -> str:
        return {
            "name": self.value,
            "anyvm": "@anyvm",
            "adminvm": "@adminvm",
            "default": "@default",
            "dispvm": "@dispvm",
            "dispvm_template": f"@dispvm:{self.value}",
            "dispvm_tag": f"@dispvm:@tag:{self.value}",
            "tag": f"@tag:{self.value}",
            "type": f"@type:{self.value}",
            "any": "*",
        }[self.kind]


@dataclass(frozen=True, slots=True)
class Rule:
    service: str
    argument: str
    source: Token
    target: Token
    action: Action
    params: tuple[tuple[str, str], ...]
    file: str
    line: int

    def param(self, key: str) -> str | None:
        return dict(self.params).get(key)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class PolicyError:
    """Something that makes a policy unusable; `line` is 0 when a whole file is at fault."""

    file: str
    line: int
    message: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def render(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Policy:
    """Rules in evaluation order, and every error found while reading them.

    A policy with errors denies every request, as Qubes does: half a policy could allow what
    the missing half would have denied.
    """

    rules: tuple[Rule, ...]
    errors: tuple[PolicyError, ...] = ()


# Sources are what a caller can be: never `@default` nor `@dispvm` (the caller has a name).
_TARGET_ONLY = {"@default": "default", "@dispvm": "dispvm"}


def parse_token(text: str, *, as_target: bool) -> Token:
    """A source or target token; ValueError explains what is wrong with it."""
    if text == "*":
        return Token("any")
    if text == "@anyvm":
        return Token("anyvm")
    if text in ("@adminvm", "dom0"):
        return Token("adminvm")
    if text in _TARGET_ONLY:
        if not as_target:
            raise ValueError(f"{text} is valid only as a target")
        return Token(_TARGET_ONLY[text])  # type: ignore[arg-type]
    for prefix, kind in (("@dispvm:@tag:", "dispvm_tag"), ("@tag:", "tag")):
        if text.startswith(prefix):
            tag = text[len(prefix) :]
            if not re.fullmatch(TAG_RE, tag):
                raise ValueError(f"bad tag name {tag!r}")
            return Token(kind, tag)  # type: ignore[arg-type]
    if text.startswith("@dispvm:"):
        template = text[len("@dispvm:") :]
        if not re.fullmatch(COMPARTMENT_NAME_RE, template):
            raise ValueError(f"bad disposable template name {template!r}")
        return Token("dispvm_template", template)
    if text.startswith("@type:"):
        vm_type = text[len("@type:") :]
        if vm_type not in VM_TYPES:
            raise ValueError(f"unknown type {vm_type!r}; known: {', '.join(VM_TYPES)}")
        return Token("type", vm_type)
    if re.fullmatch(COMPARTMENT_NAME_RE, text):
        return Token("name", text)
    raise ValueError(f"{text!r} is neither a compartment name nor an @-token")


def split_lines(text: str) -> list[str]:
    """Lines as Qubes reads a policy file: split at \\n, \\r\\n or \\r, and nowhere else."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def service_argument_problem(service: str, argument: str) -> str:
    """What is wrong with a line's service and argument fields ("" if nothing)."""
    if not SERVICE_RE.fullmatch(service):
        return f"bad service name {service!r}"
    if not ARGUMENT_RE.fullmatch(argument):
        return f"bad argument {argument!r}: use * or +ARGUMENT"
    if service == "*" and argument != "*":
        return "a * service takes only the * argument"
    return ""


def parse_line(text: str, *, file: str, line: int) -> Rule | None:
    """One policy line; None for blanks and comments. Include directives are not rules."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("!"):
        raise PolicySyntaxError(file, line, "include directives are not allowed here")
    fields = stripped.split()
    if len(fields) < 5:
        raise PolicySyntaxError(
            file, line, "expected: service argument source target action [key=value ...]"
        )
    service, argument, source, target, action, *raw_params = fields
    return rule_from_fields(
        service, argument, source, target, action, raw_params, file=file, line=line
    )


def rule_from_fields(
    service: str,
    argument: str,
    source: str,
    target: str,
    action: str,
    raw_params: Sequence[str],
    *,
    file: str,
    line: int,
) -> Rule:
    """A rule from its split fields: shared by policy.d lines and `!include-service` files."""
    problem = service_argument_problem(service, argument)
    if problem:
        raise PolicySyntaxError(file, line, problem)
    if action not in ACTIONS:
        raise PolicySyntaxError(file, line, f"unknown action {action!r}; use allow, deny or ask")
    try:
        source_token = parse_token(source, as_target=False)
        target_token = parse_token(target, as_target=True)
    except ValueError as exc:
        raise PolicySyntaxError(file, line, str(exc)) from None
    params: list[tuple[str, str]] = []
    for raw in raw_params:
        key, sep, value = raw.partition("=")
        if not sep or key not in PARAMS[action]:
            allowed = ", ".join(f"{k}=" for k in PARAMS[action])
            raise PolicySyntaxError(
                file, line, f"bad parameter {raw!r} for {action}: use {allowed}"
            )
        if any(k == key for k, _ in params):
            raise PolicySyntaxError(file, line, f"parameter {key!r} given twice")
        problem = _param_problem(key, value)
        if problem:
            raise PolicySyntaxError(file, line, problem)
        params.append((key, value))
    if target_token.kind == "default" and action == "allow" and "target" not in dict(params):
        # Nobody named a target: without target= the call would have nowhere to go.
        raise PolicySyntaxError(file, line, "allow for target @default must carry target=")
    return Rule(
        service=service,
        argument=argument,
        source=source_token,
        target=target_token,
        action=action,  # type: ignore[arg-type]
        params=tuple(params),
        file=file,
        line=line,
    )


# A redirection names one place to go, never a set of them.
REDIRECT_KINDS = ("name", "adminvm", "dispvm", "dispvm_template")


def _param_problem(key: str, value: str) -> str:
    """What is wrong with a parameter's value ("" if nothing): values reach the broker."""
    if key in ("target", "default_target"):
        try:
            token = parse_token(value, as_target=True)
        except ValueError as exc:
            return f"bad {key}={value}: {exc}"
        if token.kind not in REDIRECT_KINDS:
            return f"bad {key}={value}: name one compartment, @adminvm, @dispvm or @dispvm:NAME"
    elif key == "user":
        if not re.fullmatch(UNIX_USER_RE, value):
            return f"bad user={value!r}: not a Unix user name"
    elif value not in ("yes", "no"):
        return f"bad {key}={value!r}: use {key}=yes or {key}=no"
    return ""


def parse_text(text: str, *, file: str) -> list[Rule]:
    rules = []
    for number, line in enumerate(split_lines(text), start=1):
        rule = parse_line(line, file=file, line=number)
        if rule is not None:
            rules.append(rule)
    return rules
