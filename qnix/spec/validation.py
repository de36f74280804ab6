"""pydantic's validation errors as problems an author can act on: one per key path, located
where the author wrote it (not where pydantic looked), in words, with a hint."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import pydantic
from pydantic import BaseModel

from qnix.errors import Problem
from qnix.spec import model
from qnix.spec.model import SpecRuleError, Workstation
from qnix.spec.wording import did_you_mean, format_path, show

# What each name pattern is called, and a readable description of it for the hint.
PATTERN_NAMES = {
    model.COMPARTMENT_NAME_RE: (
        "compartment name",
        "lower-case letters, digits and '-', starting with a letter, 1-31 long",
    ),
    model.HOSTNAME_RE: (
        "host name",
        "lower-case letters, digits and '-', not starting or ending with '-'",
    ),
    model.UNIX_USER_RE: ("user name", "a Unix user name: lower-case letters, digits, '_' and '-'"),
    model.PACKAGE_RE: (
        "package name",
        "a nixpkgs attribute path such as firefox or python3Packages.requests",
    ),
    model.APP_RE: ("program name", "a program name such as firefox, without '/' or spaces"),
    model.TAG_RE: ("tag", "lower-case letters, digits, '_' and '-', starting with a letter"),
    model.SECRET_NAME_RE: (
        "secret name",
        "lower-case letters, digits, '_' and '-', starting with a letter",
    ),
    model.AGE_RECIPIENT_RE: (
        "recipient",
        "an age public key (age1...) or an ssh-ed25519 / ssh-rsa public key",
    ),
    model.FLAKE_REF_RE: (
        "flake reference",
        "a flake reference such as github:owner/repo or git+file:///path/to/qnix, without "
        "spaces, quotes or '$'",
    ),
    model.PASS_ENTRY_RE: (
        "password-store entry",
        "a pass entry such as work/vpn: letters, digits, '.', '_', '@', '+' and '-' in "
        "'/'-separated parts, none starting with '.' or '-'",
    ),
}
TYPE_MESSAGES = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a table (TOML) or an object (JSON)",
    "model_type": "must be a table (TOML) or an object (JSON)",
    "model_attributes_type": "must be a table (TOML) or an object (JSON)",
}


_ABSENT = object()


def _walk(data: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The part of a pydantic location that names places in the input.

    Drops what pydantic adds (union branch tags, `[key]`); keeps the name of a missing or
    unknown key.
    """
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, Mapping) and isinstance(part, str) and not _is_type_tag(part):
            out.append(part)  # a missing or unknown key: name it, there is nothing below
            node = None
    return tuple(out)


def _is_type_tag(part: str) -> bool:
    return part in ("int", "str", "bool", "float", "none") or "[" in part


def _is_injected_name(data: Any, loc: tuple[str | int, ...]) -> bool:
    """An error about `name` that the loader put into a compartment from its key: the key's
    own error already reports it, at the place the author wrote it."""
    if len(loc) < 3 or loc[0] != "compartments" or loc[2] != "name":
        return False
    compartments = data.get("compartments") if isinstance(data, Mapping) else None
    body = compartments.get(loc[1]) if isinstance(compartments, Mapping) else None
    return isinstance(body, Mapping) and "name" not in body


def problems_from_validation(
    file: str, data: Any, exc: pydantic.ValidationError
) -> Iterator[Problem]:
    merged: dict[str, Problem] = {}
    for error in exc.errors(include_url=False):
        raw_loc = tuple(error["loc"])
        if _is_injected_name(data, raw_loc):
            continue
        problem = _problem(file, data, raw_loc, error)
        old = merged.get(problem.path)
        if old is None:
            merged[problem.path] = problem
        elif problem.message not in old.message:
            merged[problem.path] = Problem(
                file,
                problem.path,
                f"{old.message}; {problem.message}",
                old.value or problem.value,
                old.hint or problem.hint,
            )
    yield from merged.values()


def _problem(file: str, data: Any, raw_loc: tuple[str | int, ...], error: Any) -> Problem:
    loc = _walk(data, raw_loc)
    value = error.get("input", _ABSENT)  # for a bad key, the key itself
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    cause = ctx.get("error")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else (f"known keys here: {', '.join(sorted(known))}" if known else "")
        )
        return Problem(file, format_path(loc), "unknown key", hint=hint)
    if kind == "missing":
        return Problem(file, format_path(loc), "required key is missing")
    hint = ""
    if isinstance(cause, SpecRuleError):
        if cause.at:
            loc += cause.at
            value = _lookup(data, loc)
        message, hint = cause.message, cause.hint
        if _is_structure(value):
            value = _ABSENT  # a whole rule or table: the key path says where
    elif kind == "value_error":
        message = str(cause) if cause is not None else str(error["msg"])
        if _is_structure(value):
            value = _ABSENT
    elif kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        noun, description = PATTERN_NAMES.get(pattern, ("value", f"must match {pattern}"))
        message = f"is not a valid {noun}"
        hint = description + _name_suggestion(value, pattern)
    elif kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"must be one of: {', '.join(expected)}"
        if isinstance(value, str):
            hint = did_you_mean(value, expected, cutoff=0.5)
        else:
            hint = f"a string such as {expected[0]!r}, not {_json_kind(value)}"
    elif kind in TYPE_MESSAGES:
        message = TYPE_MESSAGES[kind]
        hint = _type_hint(kind, value)
    else:
        message = _bound_message(kind, ctx) or str(error["msg"])
    shown = show(value) if value is not _ABSENT else ""
    return Problem(file, format_path(loc), message, shown, hint)


def _lookup(data: Any, loc: tuple[str | int, ...]) -> Any:
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return _ABSENT
    return node


def _is_structure(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list | tuple) and any(isinstance(v, Mapping | list) for v in value)
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    if value is None:
        return "null"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _type_hint(kind: str, value: Any) -> str:
    if isinstance(value, str):
        if kind.startswith("int") and re.fullmatch(r"-?[0-9]+", value):
            return f"write the number without quotes: {value}"
        if kind.startswith("bool") and value in ("true", "false"):
            return f"write it without quotes: {value}"
        if kind in ("tuple_type", "list_type"):
            return f"write a list, even of one item: [{show(value)}]"
    return ""


def _bound_message(kind: str, ctx: Mapping[str, Any]) -> str:
    templates = {
        "greater_than_equal": "must be at least {ge}",
        "greater_than": "must be more than {gt}",
        "less_than_equal": "must be at most {le}",
        "less_than": "must be less than {lt}",
        "string_too_long": "is longer than {max_length} characters",
        "string_too_short": "is shorter than {min_length} characters",
        "too_long": "has more than {max_length} items",
        "too_short": "has fewer than {min_length} items",
    }
    template = templates.get(kind)
    return template.format_map(dict(ctx)) if template else ""


def _name_suggestion(value: Any, pattern: str) -> str:
    """A close valid name, for the common slips: capitals, spaces, underscores."""
    if not isinstance(value, str):
        return ""
    lowered = value.strip().lower()
    for candidate in (lowered, re.sub(r"[ _]", "-", lowered)):
        if candidate != value and re.fullmatch(pattern, candidate):
            return f"; did you mean {candidate!r}?"
    return ""


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the model found at `loc` below Workstation, for did-you-mean hints."""
    annotation: Any = Workstation
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model_class = _model_in(annotation)
    return list(model_class.model_fields) if model_class else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    return [annotation]


def _step(annotation: Any, part: str | int) -> Any:
    for candidate in _unwrap(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            field = candidate.model_fields.get(str(part))
            if field is not None:
                return field.annotation
        origin = typing.get_origin(candidate)
        if origin is dict and isinstance(part, str):
            return typing.get_args(candidate)[1]
        if origin is tuple and isinstance(part, int):
            return typing.get_args(candidate)[0]
    return None
