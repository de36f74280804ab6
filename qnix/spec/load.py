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

from qnix.compile import openings
from qnix.compile.names import allocate_links
from qnix.errors import Problem, QnixError, SpecError
from qnix.policy.load import read_policy_tree
from qnix.policy.parse import (
    INLINE_POLICY_FILE,
    PolicySyntaxError,
    Rule,
    Token,
    parse_line,
    parse_token,
    split_lines,
)
from qnix.spec import model
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, SpecRuleError, Workstation

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
AGE_HEADERS = (b"age-encryption.org/v1\n", b"-----BEGIN AGE ENCRYPTED FILE-----")
MAX_SPEC_BYTES = 16 * 1024 * 1024
MAX_SECRET_BYTES = 16 * 1024 * 1024
MAX_SHOWN = 80
POLICY_FILE_RE = r"[0-9a-z_.-]{1,64}\.policy"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True, slots=True)
class LoadedSpec:
    """A validated workstation with where it came from: the build records both."""

    path: Path
    raw: bytes
    workstation: Workstation
    policy_files: tuple[tuple[str, str], ...]  # (file name, text) from the policy.d folder, sorted
    # (secret name, ciphertext) of each age secret, by name: the build carries them.
    secret_files: tuple[tuple[str, bytes], ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load(path: Path, *, missing_secrets_ok: bool = False) -> LoadedSpec:
    """Load and validate a spec; raise SpecError naming every problem.

    `missing_secrets_ok`: an age secret whose file does not exist yet is no problem (for
    `qnix secret add`, which writes it); it is left out of `secret_files`.
    """
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
    problems += _check_subnet(file, workstation)
    secret_files, secret_problems = _read_secret_files(
        path.parent, file, workstation, missing_secrets_ok
    )
    problems += secret_problems
    if problems:
        raise SpecError(problems)
    return LoadedSpec(path, raw, workstation, policy_files, secret_files)


def parse_document(path: Path, raw: bytes) -> Any:
    """Decode TOML, JSON or Nix into plain data."""
    file = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".nix"):
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
    if suffix == ".nix":
        return _eval_nix(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(file, "", f"not UTF-8 (byte {exc.start})")]) from None
    try:
        if suffix == ".toml":
            try:
                return tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise SpecError([Problem(file, "", f"TOML syntax error: {exc}")]) from None
        try:
            return json.loads(text, object_pairs_hook=_json_object)
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
        except _DuplicateKey as exc:
            raise SpecError(
                [
                    Problem(
                        file,
                        "",
                        "JSON object has a key twice",
                        show(exc.key),
                        "JSON would silently keep the last one; merge the two",
                    )
                ]
            ) from None
    except RecursionError:
        raise SpecError([Problem(file, "", "nested too deeply")]) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _eval_nix(path: Path) -> Any:
    from qnix.runtime.runner import require_tool, run

    file = str(path)
    try:
        nix_instantiate = require_tool("nix-instantiate", "nix-bin")
    except QnixError as exc:
        raise QnixError(
            f"cannot evaluate {file}: nix-instantiate is not installed",
            hint=f"{exc.hint}; or write the spec as TOML or JSON",
        ) from None
    result = run(
        [nix_instantiate, "--eval", "--strict", "--json", str(path.resolve())],
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise SpecError([Problem(file, "", "Nix evaluation failed: " + _nix_error(result.stderr))])
    try:
        return json.loads(result.stdout, object_pairs_hook=_json_object)
    except (ValueError, RecursionError):
        raise SpecError(
            [Problem(file, "", "Nix evaluation gave no JSON", hint="the file must be an attrset")]
        ) from None


def _nix_error(stderr: str) -> str:
    """The message and position of a Nix error, without the source excerpt Nix draws."""
    lines = [line.strip() for line in _ANSI_RE.sub("", stderr).splitlines() if line.strip()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    where = next((line for line in lines if line.startswith("at ")), "")
    if not errors:
        return " | ".join(lines[-3:]) or "nix-instantiate failed without a message"
    return errors[-1] + (f" ({where.rstrip(':')})" if where else "")


# ---- showing values and key paths ------------------------------------------------------------


def show(value: Any) -> str:
    """A value as the author would write it in JSON, escaped and cut to MAX_SHOWN characters."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = "(nested too deeply)"
    # Never put a terminal control character or a bidi override from a spec onto the screen.
    text = "".join(
        ch
        if ch.isprintable()
        else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        for ch in text
    )
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def format_path(loc: tuple[str | int, ...]) -> str:
    """`compartments.work.firewall[2].ports`; keys other than plain words are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]{1,64}", part):
            out += f".{part}" if out else part
        else:
            out += f"[{show(part)}]"
    return out


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


# ---- pydantic errors -> problems -------------------------------------------------------------


def _problems_from_validation(
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
            hint = _did_you_mean(value, expected, cutoff=0.5)
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


def _did_you_mean(word: str, choices: list[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}?" if close else ""


# ---- files beside the spec -------------------------------------------------------------------


def _read_policy_dir(
    base: Path, file: str, workstation: Workstation
) -> tuple[tuple[tuple[str, str], ...], list[Problem]]:
    folder = workstation.policy.dir
    if folder is None:
        return (), []
    directory = base / folder
    if not directory.is_dir():
        return (), [
            Problem(
                file,
                "policy.dir",
                "is not a folder",
                show(folder),
                "a path relative to the spec file",
            )
        ]
    files: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name.encode()):
        if not entry.name.endswith(".policy"):
            continue  # Qubes reads only *.policy; editors leave backups beside them
        if not re.fullmatch(POLICY_FILE_RE, entry.name):
            problems.append(
                Problem(
                    file,
                    "policy.dir",
                    "policy file name is not lower-case letters, digits, '_', '-' and '.'",
                    show(entry.name),
                    "rename it, such as 30-office.policy",
                )
            )
            continue
        if entry.name.encode() <= INLINE_POLICY_FILE.encode():
            problems.append(
                Problem(
                    file,
                    "policy.dir",
                    f"policy file name sorts at or before {INLINE_POLICY_FILE}, "
                    "which holds the spec's inline rules",
                    show(entry.name),
                    "the inline rules come first; rename it, such as 10-" + entry.name,
                )
            )
            continue
        try:
            files.append((entry.name, entry.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            problems.append(Problem(file, "policy.dir", f"{entry.name} is not UTF-8 text"))
        except OSError as exc:
            problems.append(
                Problem(file, "policy.dir", f"cannot read {entry.name}: {exc.strerror}")
            )
    # What the files include (!include, !include-dir, !include-service) goes along with them,
    # by relative path; the top-level files are checked line by line above and below, the
    # included ones by the policy loader itself.
    read, policy = read_policy_tree(directory, inline_rules=workstation.policy.rules)
    directives = {
        (name, number)
        for name, text in files
        for number, line in enumerate(split_lines(text), start=1)
        if line.strip().startswith("!")
    }
    files += sorted((name, text) for name, text in read.items() if "/" in name)
    problems += [
        Problem(file, "policy.dir", error.render())
        for error in policy.errors
        if "/" in error.file or (error.file, error.line) in directives
    ]
    return tuple(files), problems


@dataclass(frozen=True, slots=True)
class _PlacedRule:
    """A parsed policy rule and where to point the author: a key path, and in a policy.d
    file also `file:line` in front of the message."""

    path: str
    prefix: str
    text: str
    rule: Rule


def _policy_rules(
    file: str, workstation: Workstation, policy_files: tuple[tuple[str, str], ...]
) -> tuple[list[_PlacedRule], list[Problem]]:
    rules: list[_PlacedRule] = []
    problems: list[Problem] = []
    sources: list[tuple[str, str, int, str]] = [
        (f"policy.rules[{index}]", file, index + 1, text)
        for index, text in enumerate(workstation.policy.rules)
    ]
    for name, body in policy_files:
        if "/" in name:
            continue  # an included file: the policy loader checks it (a service file has
            # lines of another shape)
        sources += [
            ("policy.dir", name, number, line)
            for number, line in enumerate(split_lines(body), start=1)
        ]
    for path, where, number, text in sources:
        if path == "policy.dir" and text.strip().startswith("!"):
            continue  # an include directive: the policy loader follows and checks it
        prefix = "" if path != "policy.dir" else f"{where}:{number}: "
        try:
            rule = parse_line(text, file=where, line=number)
        except PolicySyntaxError as exc:
            problems.append(Problem(file, path, prefix + exc.message, show(text.strip())))
            continue
        if rule is not None:
            rules.append(_PlacedRule(path, prefix, text.strip(), rule))
    return rules, problems


def _check_token(
    file: str, placed: _PlacedRule, role: str, token: Token, workstation: Workstation
) -> Problem | None:
    """A policy token that names something the spec does not have."""
    templates = list(workstation.disposable_templates)
    vms = [*workstation.compartments, *templates]
    tags = sorted(workstation.tags())
    if token.kind == "name" and token.value not in vms:
        message, choices = f"{role} {token.value!r} names no compartment", vms
    elif token.kind in ("tag", "dispvm_tag") and token.value not in tags:
        message, choices = f"{role} tag {token.value!r} is on no compartment", tags
    elif token.kind == "dispvm_template" and token.value not in templates:
        message, choices = f"{role} {token.value!r} is no disposable template", templates
    else:
        return None
    return Problem(
        file,
        placed.path,
        placed.prefix + message,
        show(placed.text),
        _did_you_mean(token.value, choices),
    )


# ---- cross references ------------------------------------------------------------------------


def check_references(
    file: str, workstation: Workstation, policy_files: tuple[tuple[str, str], ...] = ()
) -> list[Problem]:
    """Names that must point at something: networks, secrets, templates, policy tokens."""
    problems: list[Problem] = []
    compartments = workstation.compartments
    templates = workstation.disposable_templates

    for name in sorted(set(compartments) & set(templates)):
        problems.append(
            Problem(
                file,
                f"disposable_templates.{name}",
                "has the name of a compartment",
                show(name),
                "a name can mean only one thing in a policy; rename one of them",
            )
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
            close = _did_you_mean(net, [*compartments, NETWORK_NONE, NETWORK_UPLINK])
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    "names no compartment",
                    show(net),
                    close or 'use "none", "uplink" or a net compartment',
                )
            )
        elif not target.provides_network:
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    f"{net!r} is not a net compartment",
                    show(net),
                    f"set provides_network = true in compartments.{net}",
                )
            )

    problems += _network_cycles(file, workstation)

    for where, unit in networked:
        for index, secret_name in enumerate(unit.secrets):
            secret = workstation.secrets.get(secret_name)
            if secret is None:
                problems.append(
                    Problem(
                        file,
                        f"{where}.secrets[{index}]",
                        "names no secret",
                        show(secret_name),
                        _did_you_mean(secret_name, list(workstation.secrets))
                        or "declare it under [secrets]",
                    )
                )
            elif secret.source == "pass" and unit.isolation != "namespace":
                # NixOS starts containers and VMs itself, at boot: no password store is open.
                problems.append(
                    Problem(
                        file,
                        f"{where}.secrets[{index}]",
                        f"a pass secret cannot reach a {unit.isolation} compartment",
                        show(secret_name),
                        "NixOS decrypts a container's or VM's secrets at boot with the host's "
                        'key: make it an age secret, or use isolation = "namespace"',
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
                show(workstation.default_disposable),
                _did_you_mean(workstation.default_disposable, list(templates))
                or "declare it under [disposable_templates]",
            )
        )

    rules, policy_problems = _policy_rules(file, workstation, policy_files)
    problems += policy_problems
    for placed in rules:
        rule = placed.rule
        # A qnix.Net line's argument becomes nft elements: its shape is checked here already.
        argument_problem = openings.argument_problem(rule)
        if argument_problem:
            problems.append(
                Problem(file, placed.path, placed.prefix + argument_problem, show(placed.text))
            )
        for role, token in (("source", rule.source), ("target", rule.target)):
            problem = _check_token(file, placed, role, token, workstation)
            if problem is not None:
                problems.append(problem)
        for key in ("target", "default_target"):
            value = rule.param(key)
            if value is None:
                continue
            # parse_line has checked the shape; here: does the name exist?
            problem = _check_token(
                file, placed, f"parameter {key}", parse_token(value, as_target=True), workstation
            )
            if problem is not None:
                problems.append(problem)
    return problems


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
                    show(compartments[key].network),
                    'one net compartment in the chain must use network = "uplink"',
                )
            )
    return problems


def _check_subnet(file: str, workstation: Workstation) -> list[Problem]:
    """Every compartment needs its own /31 from host.subnet."""
    subnet = workstation.host.subnet
    try:
        allocate_links(workstation.compartments, subnet)
    except ValueError as exc:
        count = len(workstation.compartments)
        return [
            Problem(
                file,
                "host.subnet",
                str(exc),
                show(subnet),
                f"a /{31 - count.bit_length()} network or larger holds {count} compartments",
            )
        ]
    return []


def _read_secret_files(
    base: Path, file: str, workstation: Workstation, missing_ok: bool
) -> tuple[tuple[tuple[str, bytes], ...], list[Problem]]:
    """The ciphertext of every age secret, and what is wrong with any of them."""
    found: list[tuple[str, bytes]] = []
    problems = []
    for name, secret in workstation.secrets.items():
        if secret.file is None:  # a pass secret: its ciphertext is in the password store
            continue
        where = f"secrets.{name}.file"
        target = base / secret.file
        try:
            with target.open("rb") as handle:
                data = handle.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError | IsADirectoryError)
            if missing and missing_ok:
                continue
            problems.append(
                Problem(
                    file,
                    where,
                    "file not found" if missing else f"cannot read: {exc.strerror}",
                    show(secret.file),
                    f"encrypt it with: qnix secret add {name} --spec {Path(file).name} "
                    "(or age -r RECIPIENT -o FILE)",
                )
            )
            continue
        if not data.startswith(AGE_HEADERS):
            problems.append(
                Problem(
                    file,
                    where,
                    "is not an age-encrypted file",
                    show(secret.file),
                    "a plaintext secret must never sit in the repo; encrypt it with age",
                )
            )
        elif len(data) > MAX_SECRET_BYTES:
            problems.append(
                Problem(file, where, f"is larger than {MAX_SECRET_BYTES} bytes", show(secret.file))
            )
        else:
            found.append((name, data))
    return tuple(found), problems
