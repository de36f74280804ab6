"""The NixOS 25.11 and microvm.nix option references, and a checker for emitted module trees.

The references (tests/data) list option names such as `containers.<name>.bindMounts.<name>.hostPath`
and `microvm.interfaces.*.id` with their types as NixOS describes them ("null or string",
"list of (submodule)", "one of "ip", "inet"", ...). The checker walks a module's value tree and,
for every path in the namespaces qnix writes (`CHECKED`), demands a declared option whose type
admits the value. `<name>` matches any attribute name of an "attribute set of", `*` any list item,
and "open submodule of attribute set of X" admits free-form children of type X besides its
declared ones. A "Toplevel NixOS config" (a container's or VM's config) is checked as a config of
its own, so the `microvm.*` options inside a VM's config are checked too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from qnix.compile.nix.printer import Call, Function, NixValue, Raw
from tests.conftest import DATA

OPTIONS_TSV = DATA / "nixos-25.11-options.tsv"
MICROVM_JSON = DATA / "microvm-options.json"
# The options of the audit module's namespaces, for the tests that check those namespaces.
AUDIT_OPTIONS_TSV = DATA / "nixos-25.11-audit-options.tsv"

# Namespaces whose every emitted path must be a declared option (a string prefix, like a glob
# `boot.kernel*`). Paths outside them are NixOS options the references do not cover.
CHECKED = (
    "boot.kernel",
    "boot.kexec",
    "containers",
    "microvm",
    "networking.nftables",
    "programs.hyprland",
    "security.allow",
    "security.apparmor",
    "security.audit",
    "services.logind",
)
# Functions that only change a definition's priority: the checker looks through them.
PRIORITY_WRAPPERS = frozenset({"lib.mkForce", "lib.mkDefault"})
INT64 = (-(2**63), 2**63 - 1)
# A Nix string literal (qnix writes some as code, to interpolate a store path).
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


# ---- the reference ---------------------------------------------------------------------------


@dataclass
class Node:
    """One step of an option path; `type` is set where an option is declared."""

    children: dict[str, Node] = field(default_factory=dict)
    type: str | None = None


def split_option_name(name: str) -> list[str]:
    """`a.b."c.d"` -> ["a", "b", "c.d"]."""
    parts = re.findall(r'"(?:[^"\\]|\\.)*"|[^.]+', name)
    return [json.loads(part) if part.startswith('"') else part for part in parts]


def tsv_lines(path: Path) -> list[tuple[str, str]]:
    """(name, type) of every option of a `name<TAB>type<TAB>readOnly` file."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, type_text, _read_only = line.split("\t")
        lines.append((name, type_text))
    return lines


def reference_lines() -> list[tuple[str, str]]:
    """(name, type) of every option in both references."""
    lines = tsv_lines(OPTIONS_TSV)
    lines += [(entry["name"], entry["type"]) for entry in json.loads(MICROVM_JSON.read_text())]
    return lines


def tree_of(lines: Iterable[tuple[str, str]]) -> Node:
    """The option tree of (name, type) lines; a name given twice must have one type."""
    root = Node()
    for name, type_text in lines:
        node = root
        for part in split_option_name(name):
            node = node.children.setdefault(part, Node())
        assert node.type in (None, type_text), f"{name}: {node.type} and {type_text}"
        node.type = type_text
    return root


@cache
def reference() -> Node:
    return tree_of(reference_lines())


# ---- types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Type:
    kind: str
    text: str
    items: tuple[Type, ...] = ()
    values: tuple[object, ...] = ()
    low: int = INT64[0]
    high: int = INT64[1]
    pattern: str = ""


class UnknownType(ValueError):
    pass


def _split_top(text: str, separator: str) -> list[str]:
    """Split at `separator` outside parentheses and double quotes."""
    parts, depth, quoted, start, index = [], 0, False, 0, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quoted:
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and text.startswith(separator, index):
            parts.append(text[start:index])
            index += len(separator)
            start = index
            continue
        index += 1
    parts.append(text[start:])
    return parts


def _wrapped(text: str) -> bool:
    """Whether the whole text is one parenthesised group."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and index < len(text) - 1:
            return False
    return True


CONTAINERS = (
    ("open submodule of attribute set of ", "open"),
    ("attribute set of ", "attrs"),
    ("list of ", "list"),
)
KERNEL_PARAM = r'([^"\s]|"[^"]*")+'
SCALARS = {
    "boolean": Type("bool", "boolean"),
    "string": Type("str", "string"),
    "non-empty string": Type("str", "non-empty string", pattern=r"(?s).+"),
    "absolute path": Type("str", "absolute path", pattern=r"(?s)/.*"),
    "signed integer": Type("int", "signed integer"),
    "unsigned integer, meaning >=0": Type("int", "unsigned", low=0),
    "positive integer, meaning >0": Type("int", "positive", low=1),
    "null": Type("null", "null"),
    "submodule": Type("submodule", "submodule"),
    "attribute set": Type("attrs", "attribute set", items=(Type("any", "any"),)),
    "Toplevel NixOS config": Type("config", "Toplevel NixOS config"),
    "package": Type("package", "package"),
    "raw value": Type("any", "raw value"),
    "unspecified value": Type("any", "unspecified value"),
    "string, with spaces inside double quotes": Type("str", "kernel param", pattern=KERNEL_PARAM),
}
_SCALAR_VALUE = (Type("bool", "boolean"), Type("int", "integer"), Type("str", "string"))
SCALARS["sysctl option value"] = Type(
    "or", "sysctl option value", items=(*_SCALAR_VALUE, Type("null", "null"))
)
SCALARS["systemd option"] = Type(
    "or",
    "systemd option",
    items=(*_SCALAR_VALUE, Type("list", "list", items=(Type("or", "scalar", _SCALAR_VALUE),))),
)


@cache
def parse_type(text: str) -> Type:
    """A NixOS type description as a Type; UnknownType for a description it cannot read."""
    text = text.strip().removesuffix(" convertible to it")
    # "X of" binds looser than "or" in NixOS' phrases: "nested attribute set of null or Y".
    for prefix, kind in CONTAINERS:
        if text.startswith(prefix):
            return Type(kind, text, items=(parse_type(text[len(prefix) :]),))
    alternatives = _split_top(text, " or ")
    if len(alternatives) > 1:
        return Type("or", text, items=tuple(parse_type(a) for a in alternatives))
    if _wrapped(text):
        return parse_type(text[1:-1])
    if text.startswith("one of "):
        values = tuple(json.loads(v) for v in _split_top(text.removeprefix("one of "), ", "))
        return Type("enum", text, values=values)
    singular = re.fullmatch(r"value (.+) \(singular enum\)", text)
    if singular:
        return Type("enum", text, values=(json.loads(singular.group(1)),))
    if text.startswith("strings concatenated with "):
        return Type("str", text)
    matching = re.fullmatch(r"string matching the pattern (.+)", text)
    if matching:
        return Type("str", text, pattern=matching.group(1))
    bounded = re.fullmatch(
        r"(?:8|16|32) bit unsigned integer; between (\d+) and (\d+) \(both inclusive\)", text
    )
    if bounded:
        return Type("int", text, low=int(bounded.group(1)), high=int(bounded.group(2)))
    if text in SCALARS:
        return SCALARS[text]
    raise UnknownType(text)


# ---- the checker -----------------------------------------------------------------------------


def dotted(parts: Sequence[str]) -> str:
    """Parts joined by dots, quoted where a part is not a plain name (or `<name>`, `*`)."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_'<>*-]+", p) else json.dumps(p) for p in parts)


def is_checked(path: Sequence[str]) -> bool:
    text = ".".join(path)
    return any(text.startswith(namespace) for namespace in CHECKED)


def _describe(value: object) -> str:
    if isinstance(value, Raw):
        return f"code `{value.code}`"
    if isinstance(value, Call):
        return f"a call of `{value.function.code}`"
    return f"{type(value).__name__} {value!r}"[:120]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    # Declared options that the tree set, as reference names (`containers.<name>.autoStart`).
    options: set[str] = field(default_factory=set)


class Checker:
    def __init__(self, root: Node | None = None) -> None:
        self.root = root if root is not None else reference()
        self.report = Report()

    def config(self, config: Mapping[str, NixValue], where: str = "") -> None:
        self.report.errors += self._walk(config, self.root, [], [], where, strict=False)

    def _walk(
        self,
        config: Mapping[str, NixValue],
        node: Node,
        path: list[str],
        pattern: list[str],
        where: str,
        *,
        strict: bool,
    ) -> list[str]:
        errors = []
        for key, value in config.items():
            child = node.children.get(key)
            sub_path, sub_pattern = [*path, key], [*pattern, key]
            if child is None:
                if strict or is_checked(sub_path):
                    errors.append(f"{where}{dotted(sub_path)}: no such option in the reference")
            elif child.type is not None:
                errors += self._option(value, child, sub_path, sub_pattern, where)
            elif isinstance(value, Mapping):
                errors += self._walk(value, child, sub_path, sub_pattern, where, strict=strict)
            elif strict or is_checked(sub_path):
                errors.append(f"{where}{dotted(sub_path)}: a set of options, given a value")
        return errors

    def _option(
        self, value: NixValue, node: Node, path: list[str], pattern: list[str], where: str
    ) -> list[str]:
        assert node.type is not None
        self.report.options.add(dotted(pattern))
        return self._check(value, parse_type(node.type), node, path, pattern, where)

    def _check(
        self,
        value: NixValue,
        type_: Type,
        node: Node | None,
        path: list[str],
        pattern: list[str],
        where: str,
    ) -> list[str]:
        at = f"{where}{dotted(path)}"
        if isinstance(value, Call) and value.function.code in PRIORITY_WRAPPERS:
            return self._check(value.argument, type_, node, path, pattern, where)
        kind = type_.kind
        if kind == "or":
            deeper = []
            for alternative in type_.items:
                errors = self._check(value, alternative, node, path, pattern, where)
                if not errors:
                    return []
                # An alternative of the right shape fails further in: report where.
                deeper += [error for error in errors if not error.startswith(f"{at}: ")]
            return deeper or [f"{at}: {_describe(value)} is not a {type_.text}"]
        if kind == "any":
            return []
        if kind == "package":
            ok = isinstance(value, Raw | Call)
            return [] if ok else [f"{at}: {_describe(value)} is not a package"]
        if kind == "config":
            if isinstance(value, Function):
                value = value.body
            if not isinstance(value, Mapping):
                return [f"{at}: {_describe(value)} is not a NixOS config"]
            return self._walk(value, self.root, [], [], f"{at}/", strict=False)
        if kind == "str" and isinstance(value, Raw) and _STRING_LITERAL.fullmatch(value.code):
            return []  # its text is qnix's own; only its type is checked here
        wrong = [f"{at}: {_describe(value)} is not a {type_.text}"]
        if isinstance(value, Raw | Call | Function):
            return wrong
        if kind == "bool":
            return [] if isinstance(value, bool) else wrong
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            return [] if ok and type_.low <= value <= type_.high else wrong
        if kind == "str":
            ok = isinstance(value, str) and (
                not type_.pattern or re.fullmatch(type_.pattern, value) is not None
            )
            return [] if ok else wrong
        if kind == "null":
            return [] if value is None else wrong
        if kind == "enum":
            ok = any(type(value) is type(v) and value == v for v in type_.values)
            return [] if ok else wrong
        if kind == "list":
            if isinstance(value, str) or not isinstance(value, Sequence):
                return wrong
            item_node = node.children.get("*") if node else None
            return [
                error
                for index, item in enumerate(value)
                for error in self._check(
                    item, type_.items[0], item_node, [*path, str(index)], [*pattern, "*"], where
                )
            ]
        if not isinstance(value, Mapping):
            return wrong
        if kind == "attrs":
            item_node = node.children.get("<name>") if node else None
            return [
                error
                for key, item in value.items()
                for error in self._check(
                    item, type_.items[0], item_node, [*path, key], [*pattern, "<name>"], where
                )
            ]
        if kind == "open":
            errors = []
            for key, item in value.items():
                declared = node.children.get(key) if node else None
                if declared is not None and declared.type is not None:
                    errors += self._option(item, declared, [*path, key], [*pattern, key], where)
                else:
                    errors += self._check(
                        item, type_.items[0], None, [*path, key], [*pattern, key], where
                    )
            return errors
        if kind == "submodule":
            if node is None:
                return [f"{at}: a submodule the reference declares no options of"]
            return self._walk(value, node, path, pattern, where, strict=True)
        raise AssertionError(f"unhandled type kind {kind}")


def check(config: Mapping[str, NixValue], root: Node | None = None) -> Report:
    checker = Checker(root)
    checker.config(config)
    return checker.report
