"""A build's inputs — the spec, its policy.d folder, its age secrets — read and checked whole.

Loading needs both layers below: the spec's own checks (qnix.spec) and the policy's files and
rules (qnix.policy), whose names must exist in the spec and whose `qnix.Net` arguments become
firewall elements; the subnet must hold a link for every compartment. Every problem is
collected and reported at once, each with the file, the key path, the value and a hint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qnix.compile import openings
from qnix.compile.names import allocate_links
from qnix.errors import Problem, SpecError
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
from qnix.spec.load import LoadedSpec, read_secret_files, read_workstation
from qnix.spec.model import Workstation
from qnix.spec.references import check_spec_references
from qnix.spec.wording import did_you_mean, show

POLICY_FILE_RE = r"[0-9a-z_.-]{1,64}\.policy"


def load(path: Path, *, missing_secrets_ok: bool = False) -> LoadedSpec:
    """Load and validate a spec; raise SpecError naming every problem.

    `missing_secrets_ok`: an age secret whose file does not exist yet is no problem (for
    `qnix secret add`, which writes it); it is left out of `secret_files`.
    """
    raw, workstation = read_workstation(path)
    loaded, problems = check_workstation(path, raw, workstation, missing_secrets_ok)
    if problems:
        raise SpecError(problems)
    return loaded


def check_workstation(
    path: Path, raw: bytes, workstation: Workstation, missing_secrets_ok: bool = False
) -> tuple[LoadedSpec, list[Problem]]:
    """A validated workstation read from `raw` (at `path`, whose folder holds its policy.d
    folder and secrets) with those files, and every problem of the whole: for a spec file
    (`load`) and for a host resolved from a fleet file (qnix.fleet)."""
    file = str(path)
    policy_files, problems = _read_policy_dir(path.parent, file, workstation)
    problems += check_references(file, workstation, policy_files)
    problems += _check_subnet(file, workstation)
    secret_files, secret_problems = read_secret_files(
        path.parent, file, workstation, missing_secrets_ok
    )
    problems += secret_problems
    return LoadedSpec(path, raw, workstation, policy_files, secret_files), problems


def check_references(
    file: str, workstation: Workstation, policy_files: tuple[tuple[str, str], ...] = ()
) -> list[Problem]:
    """Names that must point at something: networks, secrets, templates, policy tokens."""
    problems = check_spec_references(file, workstation)
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


# ---- the policy.d folder and the names its lines use ---------------------------------------------


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
        did_you_mean(token.value, choices),
    )
