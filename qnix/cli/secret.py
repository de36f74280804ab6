"""`qnix secret add|edit|rm|ls`: a spec's secrets, agenix-like, in the spec's repository.

Each works on the secrets the spec declares (`[secrets.NAME]`): `add` and `edit` encrypt to the
recipients listed there, so the spec stays the one place that says who may read a secret.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.spec.load import LoadedSpec

SPEC_OPTION = click.option(
    "--spec",
    "spec",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The spec that declares the secret; its file is relative to the spec.",
)
IDENTITY_OPTION = click.option(
    "--identity",
    "-i",
    type=click.Path(path_type=Path, dir_okay=False),
    help="age identity (default: $QNIX_AGE_IDENTITY, else /etc/qnix/host.agekey).",
)
NAME_ARG = click.argument("name")


@click.group()
def secret() -> None:
    """A spec's secrets: age files beside it (agenix-like), or pass entries."""


def _load(spec: Path, *, missing_secrets_ok: bool = False) -> LoadedSpec:
    from qnix.compile.inputs import load

    return load(spec, missing_secrets_ok=missing_secrets_ok)


@secret.command()
@NAME_ARG
@SPEC_OPTION
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Encrypt this file (default: read the secret from standard input).",
)
@click.option("--force", is_flag=True, help="Replace the secret's file if it exists.")
def add(name: str, spec: Path, from_file: Path | None, force: bool) -> None:
    """Encrypt a secret to the recipients SPEC lists for NAME and write its file."""
    from qnix.runtime import secrets

    loaded = _load(spec, missing_secrets_ok=True)
    if from_file is not None:
        target = secrets.add(loaded, name, from_file, force=force)
    else:
        if sys.stdin.isatty():
            click.echo(f"the secret {name}, ended by Ctrl-D:", err=True)
        target = secrets.add(loaded, name, sys.stdin.buffer.read(), force=force)
    recipients = len(loaded.workstation.secrets[name].recipients)
    click.echo(f"{name}: wrote {target} ({recipients} recipient{'s' if recipients != 1 else ''})")


@secret.command()
@NAME_ARG
@SPEC_OPTION
@IDENTITY_OPTION
def edit(name: str, spec: Path, identity: Path | None) -> None:
    """Decrypt NAME into a private tmpfs folder, run $EDITOR on it, re-encrypt if it changed;
    the plaintext is wiped afterwards. A secret without a file yet starts empty."""
    from qnix.runtime import secrets

    loaded = _load(spec, missing_secrets_ok=True)
    changed = secrets.edit(loaded, name, identity, secrets.editor_command())
    click.echo(f"{name}: re-encrypted" if changed else f"{name}: unchanged")


@secret.command(name="rm")
@NAME_ARG
@SPEC_OPTION
def remove(name: str, spec: Path) -> None:
    """Delete NAME's file (refused while a compartment lists NAME)."""
    from qnix.runtime import secrets

    target = secrets.remove(_load(spec, missing_secrets_ok=True), name)
    click.echo(f"{name}: removed {target}; now drop [secrets.{name}] from {spec}")


@secret.command(name="ls")
@SPEC_OPTION
@IDENTITY_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
def list_secrets(spec: Path, identity: Path | None, as_json: bool) -> None:
    """Each secret: source, file or entry, recipients, who uses it, whether IDENTITY opens it."""
    from qnix.runtime import secrets

    found = secrets.statuses(_load(spec, missing_secrets_ok=True), identity)
    if as_json:
        click.echo(json.dumps([status.to_json() for status in found], indent=2))
        return
    if not found:
        raise QnixError(f"{spec} declares no secrets", hint="declare one under [secrets.NAME]")
    rows = [("NAME", "SOURCE", "FILE/ENTRY", "RECIPIENTS", "USED BY", "STATUS")]
    for status in found:
        recipients = ", ".join(_short(r) for r in status.recipients) or "-"
        rows.append(
            (
                status.name,
                status.source,
                status.location,
                recipients,
                ", ".join(status.used_by) or "-",
                status.status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _short(recipient: str) -> str:
    """`age1abcd…wxyz`: enough to tell keys apart in a table."""
    key = recipient.split()[-1] if recipient.startswith("ssh-") else recipient
    prefix = recipient.split()[0] + " " if recipient.startswith("ssh-") else ""
    return prefix + (key if len(key) <= 16 else f"{key[:8]}…{key[-4:]}")
