"""Read a spec file (TOML, JSON or .nix), validate it, and check its cross references.

Every problem is collected and reported at once, each with the file, the key path
(`compartments.work.firewall[2].ports`), the offending value and a hint.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel

from qnix.errors import Problem, QnixError, SpecError
from qnix.policy.parse import PolicySyntaxError, Rule, parse_line, parse_text, parse_token
from qnix.spec import model
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, Workstation

# Readable descriptions of the name patterns, shown as hints.
PATTERN_HINTS = {
    model.COMPARTMENT_NAME_RE: "lower-case letters, digits and '-', starting with a letter, 1-31 long",  # noqa: E501
    model.HOSTNAME_RE: "lower-case letters, digits and '-', not starting or ending with '-'",
    model.UNIX_USER_RE: "a Unix user name: lower-case letters, digits, '_' and '-'",
    model.PACKAGE_RE: "a nixpkgs attribute path such as firefox or python3Packages.requests",
    model.APP_RE: "a program name such as firefox, without '/' or spaces",
    model.TAG_RE: "lower-case letters, digits, '_' and '-', starting with a letter",
    model.SECRET_NAME_RE: "lower-case letters, digits, '_' and '-', starting with a letter",
    model.AGE_RECIPIENT_RE: "an age public key (age1...) or an ssh-ed25519 / ssh-rsa public key",
}
AGE_HEADERS = (b"age-encryption.org/v1\n", b"-----BEGIN AGE ENCRYPTED FILE-----")
MAX_SPEC_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LoadedSpec:
    """A validated workstation with where it came from: the build records both."""

    path: Path
    raw: bytes
    workstation: Workstation
    policy_files: tuple[tuple[str, str], ...]  # (file name, text) from the policy.d folder, sorted

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load(path: Path) -> LoadedSpec:
    """Load and validate a spec; raise SpecError naming every problem."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QnixError(f"cannot read spec {file}: {exc.strerror}", hint="check the path") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([Problem(file, "", f"spec is larger than {MAX_SPEC_BYTES} bytes")])
    data = parse_document(path, raw)
    try:
        workstation = Workstation.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(list(_problems_from_validation(file, data, exc))) from None
    policy_files, problems = _read_policy_dir(path.parent, file, workstation)
    problems += check_references(file, workstation, policy_files)
    problems += _check_secret_files(path.parent, file, workstation)
    if problems:
        raise SpecError(problems)
    return LoadedSpec(path, raw, workstation, policy_files)


def parse_document(path: Path, raw: bytes) -> Any:
    """Decode TOML, JSON or Nix into plain data."""
    file = str(path)
    suffix = path.suffix.lower()
    if suffix == ".nix":
        return _eval_nix(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(file, "", f"not UTF-8 (byte {exc.start})")]) from None
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError([Problem(file, "", f"TOML syntax error: {exc}")]) from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [
                    Problem(
                        file,
                        "",
                        f"JSON syntax error at line {exc.lineno} column {exc.colno}: {exc.msg}",
                    )
                ]
            ) from None
    raise SpecError(
        [
            Problem(
                file,
                "",
                f"unknown spec format {suffix or '(no suffix)'!r}",
                hint="use .toml, .json or .nix",
            )
        ]
    )


def _eval_nix(path: Path) -> Any:
    from qnix.runtime.runner import require_tool, run

    nix_instantiate = require_tool("nix-instantiate", "nix-bin")
    result = run(
        [nix_instantiate, "--eval", "--strict", "--json", str(path.resolve())],
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()
        raise SpecError(
            [Problem(str(path), "", "Nix evaluation failed: " + " | ".join(message[-5:]))]
        )
    return json.loads(result.stdout)


# ---- pydantic errors -> problems -------------------------------------------------------------


def format_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _real_loc(data: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The part of a pydantic location that names places in the input (drops union tags)."""
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
        # else: a union branch tag such as 'int' or 'function-after[...]'
    return tuple(out)


def _is_type_tag(part: str) -> bool:
    return part in ("int", "str", "bool", "float", "none") or "[" in part


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _problems_from_validation(
    file: str, data: Any, exc: pydantic.ValidationError
) -> Iterator[Problem]:
    merged: dict[str, Problem] = {}
    for error in exc.errors(include_url=False):
        loc = _real_loc(data, tuple(error["loc"]))
        path = format_path(loc)
        problem = _problem(file, path, loc, error)
        if path in merged:
            old = merged[path]
            if problem.message not in old.message:
                merged[path] = Problem(
                    file,
                    path,
                    f"{old.message}, or {problem.message}",
                    old.value,
                    old.hint or problem.hint,
                )
        else:
            merged[path] = problem
    yield from merged.values()


def _problem(file: str, path: str, loc: tuple[str | int, ...], error: Any) -> Problem:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else (f"known keys here: {', '.join(sorted(known))}" if known else "")
        )
        return Problem(file, path, "unknown key", hint=hint)
    if kind == "missing":
        return Problem(file, path, "required key is missing")
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    hint = ""
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        message = "is not a valid name"
        hint = PATTERN_HINTS.get(pattern, f"must match {pattern}")
    elif kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"must be one of: {', '.join(expected)}"
        close = difflib.get_close_matches(str(value), expected, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else ""
    elif (
        loc
        and isinstance(loc[-1], str)
        and loc[-1] in _fields_at(loc[:-1])
        and isinstance(value, Mapping)
    ):
        value = None  # an object-level rule: the key path says where, the value would be noise
    return Problem(file, path, message, value=_short(value) if value is not None else "", hint=hint)


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


# ---- cross references ------------------------------------------------------------------------


def _read_policy_dir(
    base: Path, file: str, workstation: Workstation
) -> tuple[tuple[tuple[str, str], ...], list[Problem]]:
    folder = workstation.policy.dir
    if folder is None:
        return (), []
    directory = (base / folder).resolve()
    if not directory.is_dir():
        return (), [
            Problem(
                file,
                "policy.dir",
                "is not a folder",
                _short(folder),
                "a path relative to the spec file",
            )
        ]
    files = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name.encode()):
        if entry.suffix != ".policy":
            continue
        files.append((entry.name, entry.read_text(encoding="utf-8")))
    return tuple(files), []


def _policy_rules(
    file: str, workstation: Workstation, policy_files: tuple[tuple[str, str], ...]
) -> tuple[list[tuple[str, Rule]], list[Problem]]:
    rules: list[tuple[str, Rule]] = []
    problems: list[Problem] = []
    for index, text in enumerate(workstation.policy.rules):
        path = f"policy.rules[{index}]"
        try:
            rule = parse_line(text, file=file, line=index + 1)
        except PolicySyntaxError as exc:
            problems.append(Problem(file, path, exc.message, _short(text)))
            continue
        if rule is not None:
            rules.append((path, rule))
    for name, text in policy_files:
        if not re.fullmatch(r"[0-9a-z_.-]+", name):
            problems.append(
                Problem(file, "policy.dir", f"policy file name {name!r} is not [0-9a-z_.-]")
            )
            continue
        try:
            rules.extend((f"policy.dir/{name}:{r.line}", r) for r in parse_text(text, file=name))
        except PolicySyntaxError as exc:
            problems.append(Problem(file, "policy.dir", str(exc)))
    return rules, problems


def check_references(
    file: str, workstation: Workstation, policy_files: tuple[tuple[str, str], ...] = ()
) -> list[Problem]:
    """Names that must point at something: networks, secrets, templates, policy tokens."""
    problems: list[Problem] = []
    compartments = workstation.compartments
    templates = workstation.disposable_templates

    for name in sorted(set(compartments) & set(templates)):
        problems.append(
            Problem(file, f"disposable_templates.{name}", "has the name of a compartment")
        )

    networked: list[tuple[str, model.CompartmentBase]] = [
        *((f"compartments.{n}", c) for n, c in compartments.items()),
        *((f"disposable_templates.{n}", t) for n, t in templates.items()),
    ]
    for where, unit in networked:
        net = unit.network
        if net in (NETWORK_NONE, NETWORK_UPLINK):
            continue
        target = compartments.get(net)
        if target is None:
            close = difflib.get_close_matches(net, list(compartments), n=1)
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    "names no compartment",
                    _short(net),
                    f"did you mean {close[0]!r}?"
                    if close
                    else 'use "none", "uplink" or a net compartment',
                )
            )
        elif not target.provides_network:
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    f"{net!r} is not a net compartment",
                    _short(net),
                    f"set provides_network = true in compartments.{net}",
                )
            )

    problems += _network_cycles(file, workstation)

    for name, compartment in compartments.items():
        for index, secret in enumerate(compartment.secrets):
            if secret not in workstation.secrets:
                close = difflib.get_close_matches(secret, list(workstation.secrets), n=1)
                problems.append(
                    Problem(
                        file,
                        f"compartments.{name}.secrets[{index}]",
                        "names no secret",
                        _short(secret),
                        f"did you mean {close[0]!r}?" if close else "declare it under [secrets]",
                    )
                )

    if (
        workstation.default_disposable is not None
        and workstation.default_disposable not in templates
    ):
        problems.append(
            Problem(
                file,
                "default_disposable",
                "names no disposable template",
                _short(workstation.default_disposable),
                "declare it under [disposable_templates]",
            )
        )

    rules, policy_problems = _policy_rules(file, workstation, policy_files)
    problems += policy_problems
    known_tags = workstation.tags()
    for where, rule in rules:
        for role, token in (("source", rule.source), ("target", rule.target)):
            if (
                token.kind == "name"
                and token.value not in compartments
                and token.value not in templates
            ):
                problems.append(
                    Problem(
                        file,
                        where,
                        f"{role} {token.value!r} names no compartment",
                        _short(str(token)),
                        _did_you_mean(token.value, [*compartments, *templates]),
                    )
                )
            elif token.kind in ("tag", "dispvm_tag") and token.value not in known_tags:
                problems.append(
                    Problem(
                        file,
                        where,
                        f"{role} tag {token.value!r} is on no compartment",
                        _short(str(token)),
                        _did_you_mean(token.value, sorted(known_tags)),
                    )
                )
            elif token.kind == "dispvm_template" and token.value not in templates:
                problems.append(
                    Problem(
                        file,
                        where,
                        f"{role} {token.value!r} is no disposable template",
                        _short(str(token)),
                        _did_you_mean(token.value, list(templates)),
                    )
                )
        for key in ("target", "default_target"):
            value = rule.param(key)
            if value is None:
                continue
            try:
                token = parse_token(value, as_target=True)
            except ValueError as exc:
                problems.append(Problem(file, where, f"{key}= {exc}", _short(value)))
                continue
            if token.kind == "name" and token.value not in compartments:
                problems.append(
                    Problem(
                        file,
                        where,
                        f"{key}={value} names no compartment",
                        _short(value),
                        _did_you_mean(value, list(compartments)),
                    )
                )
    return problems


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def _network_cycles(file: str, workstation: Workstation) -> list[Problem]:
    """A net chain must end at the uplink; report each cycle once, from its smallest name."""
    problems = []
    compartments = workstation.compartments
    reported: set[str] = set()
    for start in compartments:
        seen: list[str] = []
        current: str | None = start
        while current is not None and current in compartments and current not in seen:
            seen.append(current)
            current = compartments[current].network
        if current is not None and current in seen:
            cycle = seen[seen.index(current) :]
            key = min(cycle)
            if key in reported:
                continue
            reported.add(key)
            ring = " -> ".join([*cycle, current])
            problems.append(
                Problem(
                    file,
                    f"compartments.{key}.network",
                    f"network chain is a cycle: {ring}",
                    hint='one net compartment in the chain must use network = "uplink"',
                )
            )
    return problems


def _check_secret_files(base: Path, file: str, workstation: Workstation) -> list[Problem]:
    problems = []
    for name, secret in workstation.secrets.items():
        where = f"secrets.{name}.file"
        target = base / secret.file
        if not target.is_file():
            problems.append(
                Problem(
                    file,
                    where,
                    "file not found",
                    _short(secret.file),
                    "encrypt it with: age -r RECIPIENT -o FILE",
                )
            )
            continue
        with target.open("rb") as handle:
            head = handle.read(64)
        if not head.startswith(AGE_HEADERS):
            problems.append(
                Problem(
                    file,
                    where,
                    "is not an age-encrypted file",
                    _short(secret.file),
                    "a plaintext secret must never sit in the repo; encrypt it with age",
                )
            )
    return problems
