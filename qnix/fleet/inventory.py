"""A fleet repository's inventory: `fleet.toml`, its roles and hosts, each host's spec.

    [fleet]
    name = "acme"
    policy_dir = "policy.d"            # shared by every host (optional)

    [roles.office.compartments.work]   # a role: a fragment of a spec
    memory_mb = 1024

    [hosts.desk-01]
    system = "x86_64-linux"
    roles = ["office"]
    nixos = false
    age_key = "age1..."                # the host's age recipient
    overrides.compartments.work.memory_mb = 2048

A host's spec is `host.hostname` (the host's name) and `host.system`, the shared policy folder,
then each of its roles in order, then its overrides, merged key by key (a table merges into a
table, any other value — a list too — replaces what was there). It is then checked exactly as
`qnix check` checks a spec file, and every problem is reported at the place of the fleet file
that wrote the value: `hosts.desk-03.overrides.compartments.work.memory_mb`,
`roles.office.policy.rules[1]`. The secrets a host's spec lists must have the host's age key
among their recipients, and a secret it does not use must not: each desk can decrypt what it
needs and only that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import Field, StringConstraints

from qnix.compile.inputs import check_workstation
from qnix.errors import Problem, SpecError
from qnix.spec.document import parse_document
from qnix.spec.load import LoadedSpec
from qnix.spec.model import (
    AGE_RECIPIENT_RE,
    HOSTNAME_RE,
    TAG_RE,
    Model,
    RelPath,
    System,
    Workstation,
)
from qnix.spec.validation import problems_from_validation
from qnix.spec.wording import did_you_mean, format_path, show

FLEET_FILE = "fleet.toml"
SIGNERS_FILE = "allowed_signers"  # beside it: who may sign changes (OpenSSH format)
MAX_FLEET_BYTES = 16 * 1024 * 1024

RoleName = Annotated[str, StringConstraints(pattern=TAG_RE)]
HostName = Annotated[str, StringConstraints(pattern=HOSTNAME_RE)]


class FleetSettings(Model):
    name: HostName
    policy_dir: RelPath | None = None


class FleetHost(Model):
    system: System = "x86_64-linux"
    roles: tuple[RoleName, ...] = Field(default=(), strict=False)  # a TOML list
    nixos: bool = True
    age_key: Annotated[str, StringConstraints(pattern=AGE_RECIPIENT_RE)] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class FleetFile(Model):
    fleet: FleetSettings
    roles: dict[RoleName, dict[str, Any]] = Field(default_factory=dict)
    hosts: dict[HostName, FleetHost] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fleet:
    path: Path
    file: FleetFile

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def allowed_signers(self) -> Path:
        return self.base_dir / SIGNERS_FILE


@dataclass(frozen=True, slots=True)
class HostDocument:
    """A host's spec as plain data, and for each key path in it (formatted, as a problem
    names it) the key path of the fleet file that wrote it."""

    data: dict[str, Any]
    origins: dict[str, str]

    def locate(self, problem: Problem, file: str) -> Problem:
        """`problem` of the host's spec, moved to where the fleet file wrote its value."""
        path = problem.path
        best = ""
        for written in self.origins:
            if (path == written or path.startswith((written + ".", written + "["))) and len(
                written
            ) > len(best):
                best = written
        moved = self.origins.get(best, "") + path[len(best) :]
        return Problem(file, moved, problem.message, problem.value, problem.hint)


def read_fleet(path: Path) -> Fleet:
    """A fleet file, validated for its own shape; a SpecError names every problem."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError([Problem(file, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_FLEET_BYTES:
        raise SpecError([Problem(file, "", f"is larger than {MAX_FLEET_BYTES} bytes")])
    data = parse_document(path, raw)
    try:
        parsed = FleetFile.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(list(problems_from_validation(file, data, exc))) from None
    problems = []
    for host, entry in parsed.hosts.items():
        for index, role in enumerate(entry.roles):
            if role not in parsed.roles:
                problems.append(
                    Problem(
                        file,
                        f"hosts.{host}.roles[{index}]",
                        "names no role",
                        show(role),
                        did_you_mean(role, list(parsed.roles)) or "roles are [roles.NAME] tables",
                    )
                )
    if problems:
        raise SpecError(problems)
    return Fleet(path, parsed)


def _merge(
    into: dict[str, Any],
    fragment: Mapping[str, Any],
    at: tuple[str | int, ...],
    source: tuple[str | int, ...],
    origins: dict[str, str],
) -> None:
    for key, value in fragment.items():
        here = (*at, key)
        origins[format_path(here)] = format_path((*source, key))
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, here, (*source, key), origins)
        else:
            into[key] = json.loads(json.dumps(value))  # a copy: later fragments merge into it
            if isinstance(value, Mapping):
                for inner in _paths(value):
                    origins[format_path((*here, *inner))] = format_path((*source, key, *inner))


def _paths(value: Mapping[str, Any]) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = []
    for key, inner in value.items():
        found.append((key,))
        if isinstance(inner, Mapping):
            found += [(key, *rest) for rest in _paths(inner)]
    return found


def host_document(fleet: Fleet, name: str) -> HostDocument:
    """The spec of host `name` as plain data, before validation."""
    entry = fleet.file.hosts[name]
    data: dict[str, Any] = {}
    origins: dict[str, str] = {"": f"hosts.{name}"}
    base: dict[str, Any] = {"host": {"hostname": name, "system": entry.system}}
    _merge(data, base, (), ("hosts", name), origins)
    origins["host.system"] = f"hosts.{name}.system"
    origins["host.hostname"] = f"hosts.{name}"
    if fleet.file.fleet.policy_dir is not None:
        _merge(data, {"policy": {"dir": fleet.file.fleet.policy_dir}}, (), (), origins)
        origins["policy.dir"] = "fleet.policy_dir"
    for role in entry.roles:
        _merge(data, fleet.file.roles[role], (), ("roles", role), origins)
    _merge(data, entry.overrides, (), ("hosts", name, "overrides"), origins)
    return HostDocument(data, origins)


def host_spec(fleet: Fleet, name: str) -> LoadedSpec:
    """Host `name`'s spec, checked whole as `qnix check` checks a spec file (its policy folder
    and secrets relative to the fleet file), with the fleet's secret rules; a SpecError names
    every problem at its place in the fleet file."""
    file = str(fleet.path)
    if name not in fleet.file.hosts:
        raise SpecError(
            [
                Problem(
                    file,
                    "hosts",
                    f"has no host {name!r}",
                    hint=did_you_mean(name, list(fleet.file.hosts)) or "hosts are [hosts.NAME]",
                )
            ]
        )
    document = host_document(fleet, name)
    written = document.origins.get("host.hostname", "")
    if written != f"hosts.{name}":  # a role or an override named the host otherwise
        raise SpecError(
            [
                Problem(
                    file,
                    written,
                    "a host's name is its key under [hosts]; roles and overrides cannot set it",
                    show(document.data["host"].get("hostname")),
                    "remove this key",
                )
            ]
        )
    raw = (json.dumps(document.data, indent=2, sort_keys=True) + "\n").encode()
    try:
        workstation = Workstation.model_validate(document.data)
    except pydantic.ValidationError as exc:
        found = problems_from_validation(file, document.data, exc)
        raise SpecError([document.locate(p, file) for p in found]) from None
    loaded, problems = check_workstation(fleet.path, raw, workstation)
    problems += _secret_problems(fleet, name, workstation)
    if problems:
        raise SpecError([document.locate(p, file) for p in problems])
    return loaded


def _used_secrets(workstation: Workstation) -> set[str]:
    bodies = (*workstation.compartments.values(), *workstation.disposable_templates.values())
    return {secret for body in bodies for secret in body.secrets}


def _secret_problems(fleet: Fleet, name: str, workstation: Workstation) -> list[Problem]:
    """The host's age key among the recipients of each age secret it uses."""
    key = fleet.file.hosts[name].age_key
    used = _used_secrets(workstation)
    problems = []
    for secret_name, secret in sorted(workstation.secrets.items()):
        if secret.source != "age":
            continue
        where = f"secrets.{secret_name}.recipients"
        if secret_name in used and (key is None or key not in secret.recipients):
            problems.append(
                Problem(
                    str(fleet.path),
                    where,
                    f"host {name} uses this secret but its age key is not a recipient",
                    hint=f"set hosts.{name}.age_key and add it to the recipients, then "
                    f"re-encrypt: qnix secret edit {secret_name}"
                    if key is None
                    else f"add {key} and re-encrypt the secret",
                )
            )
    return problems


def check_fleet(fleet: Fleet) -> dict[str, LoadedSpec]:
    """Every host's spec, checked; a SpecError names every problem of every host."""
    loaded: dict[str, LoadedSpec] = {}
    problems: list[Problem] = []
    for name in sorted(fleet.file.hosts):
        try:
            loaded[name] = host_spec(fleet, name)
        except SpecError as exc:
            problems += [p for p in exc.problems if p not in problems]
    problems += _needless_recipients(fleet, loaded)
    if not fleet.allowed_signers.is_file():
        problems.append(
            Problem(
                str(fleet.path),
                "",
                f"{SIGNERS_FILE} beside it: file not found",
                "",
                "the OpenSSH allowed_signers file of the keys that may sign changes",
            )
        )
    elif not _signers_lines(fleet.allowed_signers.read_text(encoding="utf-8", errors="replace")):
        problems.append(
            Problem(
                str(fleet.path),
                "",
                f"{SIGNERS_FILE} beside it lists no key",
                "",
                "one line per admin: PRINCIPAL ssh-ed25519 AAAA... (ssh-keygen -Y, OpenSSH)",
            )
        )
    if problems:
        raise SpecError(problems)
    return loaded


def _needless_recipients(fleet: Fleet, loaded: Mapping[str, LoadedSpec]) -> list[Problem]:
    """A host key among the recipients of a secret, wherever the fleet file writes one, that
    the host's spec does not use: that desk could decrypt what it has no need of."""
    fragments: list[tuple[str, Any]] = [
        (f"roles.{r}", body) for r, body in fleet.file.roles.items()
    ]
    fragments += [(f"hosts.{h}.overrides", e.overrides) for h, e in fleet.file.hosts.items()]
    problems = []
    for where, fragment in fragments:
        secrets = fragment.get("secrets") if isinstance(fragment, Mapping) else None
        for secret_name, secret in (secrets or {}).items():
            recipients = secret.get("recipients") if isinstance(secret, Mapping) else None
            for host, entry in sorted(fleet.file.hosts.items()):
                if host not in loaded or entry.age_key not in (recipients or ()):
                    continue
                if secret_name not in _used_secrets(loaded[host].workstation):
                    problems.append(
                        Problem(
                            str(fleet.path),
                            f"{where}.secrets.{secret_name}.recipients",
                            f"host {host} can decrypt this secret but uses it nowhere",
                            show(entry.age_key),
                            "remove the host's key from the recipients and re-encrypt the secret",
                        )
                    )
    return problems


def _signers_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and re.search(r"\bssh-|ecdsa-", line)
    ]
