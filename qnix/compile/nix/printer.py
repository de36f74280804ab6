"""The one printer from Python values to Nix expressions.

Spec text only ever reaches Nix through `string()` and `attr_name()`, which escape it; code that
qnix itself writes is wrapped in `Raw` and never built from spec text (only from validated
identifiers such as nixpkgs attribute paths).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

NIX_KEYWORDS = frozenset(
    {"if", "then", "else", "assert", "with", "let", "in", "rec", "inherit", "or", "__curPos"}
)
_BARE_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_ESCAPES = {"\\": "\\\\", '"': '\\"', "$": "\\$", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True, slots=True)
class Raw:
    """Nix code written by qnix (e.g. `pkgs.firefox`, `lib.mkForce true`)."""

    code: str


@dataclass(frozen=True, slots=True)
class Function:
    """`{ a, b, ... }: body`."""

    params: tuple[str, ...]
    body: NixValue


@dataclass(frozen=True, slots=True)
class Call:
    """`function argument`, the function being code qnix writes (e.g. `lib.mkForce`)."""

    function: Raw
    argument: NixValue


NixValue: TypeAlias = (
    bool
    | int
    | str
    | Raw
    | Function
    | Call
    | Sequence["NixValue"]
    | Mapping[str, "NixValue"]
    | None
)


def string(text: str) -> str:
    """A Nix double-quoted string whose value is exactly `text`."""
    if "\x00" in text:
        raise ValueError("Nix strings cannot hold NUL characters")
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in text) + '"'


def attr_name(name: str) -> str:
    """An attribute name: bare where Nix allows it, else a quoted string."""
    if _BARE_ATTR.fullmatch(name) and name not in NIX_KEYWORDS:
        return name
    return string(name)


def identifier(name: str) -> str:
    """A bare identifier (function parameter); refuses anything else."""
    if not _BARE_ATTR.fullmatch(name) or name in NIX_KEYWORDS:
        raise ValueError(f"not a Nix identifier: {name!r}")
    return name


def attr_path(*parts: str) -> Raw:
    """`pkgs.python3Packages.requests` from validated parts, each part quoted when needed."""
    return Raw(".".join(attr_name(p) if i else identifier(p) for i, p in enumerate(parts)))


_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._+-]+")


def path_literal(relative: str, up: int = 0) -> Raw:
    """`./hosts/desk-01/flake.nix` (or, `up` folders higher, `../allowed_signers`): a relative
    path literal; refuses what Nix would read otherwise (an empty, `.` or `..` segment, or a
    character a path literal cannot hold)."""
    segments = relative.split("/")
    if not all(_PATH_SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments):
        raise ValueError(f"not a plain relative path: {relative!r}")
    return Raw(("../" * up or "./") + relative)


def _int(value: int) -> str:
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"{value} does not fit a Nix integer")
    if value == _INT_MIN:
        return f"({_INT_MIN + 1} - 1)"
    # Parenthesised: `[ 1 -2 ]` would be a subtraction.
    return f"({value})" if value < 0 else str(value)


def render(value: NixValue, indent: int = 0) -> str:
    """Render `value` as a Nix expression, two-space indented, deterministic."""
    pad = "  " * indent
    inner = "  " * (indent + 1)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, Raw):
        return value.code
    if isinstance(value, Function):
        params = ", ".join([*(identifier(p) for p in value.params), "..."])
        return f"{{ {params} }}:\n{pad}" + render(value.body, indent)
    if isinstance(value, Call):
        argument = render(value.argument, indent)
        if isinstance(value.argument, Function | Call) or (
            isinstance(value.argument, Raw) and not _is_atom(argument)
        ):
            argument = f"({argument})"
        return f"{value.function.code} {argument}"
    if isinstance(value, Mapping):
        if not value:
            return "{ }"
        lines = []
        # Attribute sets have no order in Nix: sorted, the same spec gives the same text.
        for key, item in sorted(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"attribute names must be str, not {type(key).__name__}")
            lines.append(f"{inner}{attr_name(key)} = {_item(item, indent + 1)};")
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, Sequence):
        if not value:
            return "[ ]"
        items = [f"{inner}{_item(item, indent + 1)}" for item in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    raise TypeError(f"cannot render {type(value).__name__} as Nix")


def _item(value: NixValue, indent: int) -> str:
    """A list element or attribute value: functions, calls and raw code get parentheses."""
    text = render(value, indent)
    if isinstance(value, Function | Call | Raw) and not _is_atom(text):
        return f"({text})"
    return text


def _is_atom(code: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'.\"-]*", code))
