"""`qnix state ls|snapshot|restore|diff NAME`: a persistent compartment's encrypted, versioned
state (qnix.runtime.state)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from qnix.cli.options import runtime_options, runtime_paths
from qnix.errors import QnixError

_F = TypeVar("_F", bound=Callable[..., Any])
NAME_ARG = click.argument("name")


def _identity_option(command: _F) -> _F:
    return click.option(
        "--identity",
        type=click.Path(path_type=Path, dir_okay=False),
        help="The host's age identity (default: QNIX_AGE_IDENTITY, else /etc/qnix/host.agekey).",
    )(command)


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    scaled = count / 1024
    unit = "KiB"
    for bigger in ("MiB", "GiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, bigger
    return f"{scaled:.1f} {unit}"


@click.group()
def state() -> None:
    """A persistent compartment's state: snapshots (one at each stop), restore, diff."""


@state.command(name="ls")
@NAME_ARG
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
def ls(name: str, state_root: Path | None, run_root: Path | None, as_json: bool) -> None:
    """List the snapshots of NAME: id, time, reason, kind (age: an encrypted copy; btrfs: a
    read-only btrfs snapshot), size and sha256 of the ciphertext (a btrfs snapshot's UUID), and
    whether it is the latest and within the spec's retention (else: removed at the next)."""
    from qnix.runtime import state as snapshots

    found = snapshots.listing(runtime_paths(state_root, run_root), name)
    if as_json:
        click.echo(json.dumps([row.to_json() for row in found], indent=2))
        return
    if not found:
        click.echo(f"{name}: no snapshots")
        return
    table = [("ID", "TIME", "REASON", "KIND", "SIZE", "SHA256/UUID", "STATUS")]
    for row in found:
        status = "latest" if row.latest else ("kept" if row.kept else "expires")
        size = "-" if row.size is None else _size(row.size)
        fingerprint = row.sha256 or row.uuid or "-"
        table.append((str(row.id), row.time, row.reason, row.kind, size, fingerprint, status))
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    for cells in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        )


@state.command()
@NAME_ARG
@runtime_options
@_identity_option
@click.option(
    "--force", is_flag=True, help="Take it while NAME runs (files may be caught mid-write)."
)
def snapshot(
    name: str, state_root: Path | None, run_root: Path | None, identity: Path | None, force: bool
) -> None:
    """Take a snapshot of NAME's state now. NAME must be stopped unless --force."""
    from qnix.runtime import state as snapshots

    taken = snapshots.snapshot(
        runtime_paths(state_root, run_root), name, identity=identity, force=force
    )
    what = "btrfs snapshot" if taken.size is None else _size(taken.size)
    click.echo(f"{name}: snapshot {taken.id} ({what}, {taken.time})")


@state.command()
@NAME_ARG
@click.argument("snapshot_id", metavar="[ID]", type=int, required=False)
@runtime_options
@_identity_option
def restore(
    name: str,
    snapshot_id: int | None,
    state_root: Path | None,
    run_root: Path | None,
    identity: Path | None,
) -> None:
    """Make NAME's state snapshot ID (default: the latest). NAME must be stopped; its state
    before is kept as a snapshot first."""
    from qnix.runtime import state as snapshots

    done = snapshots.restore(
        runtime_paths(state_root, run_root), name, snapshot_id, identity=identity
    )
    kept = f"; the state before is snapshot {done.previous.id}" if done.previous else ""
    click.echo(f"{name}: restored snapshot {done.restored.id} ({done.entries} entries){kept}")


@state.command()
@NAME_ARG
@click.argument("first", metavar="[ID]", type=int, required=False)
@click.argument("second", metavar="[ID2]", type=int, required=False)
@click.option("--live", is_flag=True, help="Compare with the live folder (the default).")
@runtime_options
@_identity_option
@click.option("--json", "as_json", is_flag=True, help="{added, removed, changed}, for scripts.")
def diff(
    name: str,
    first: int | None,
    second: int | None,
    live: bool,
    state_root: Path | None,
    run_root: Path | None,
    identity: Path | None,
    as_json: bool,
) -> None:
    """What was added, removed and changed from snapshot ID (default: the latest) to
    snapshot ID2, or to the live folder. Changed: another kind, permissions, content or
    link target."""
    from qnix.runtime import state as snapshots
    from qnix.runtime.archives import shown

    if live and second is not None:
        raise QnixError("give a second snapshot or --live, not both")
    found = snapshots.diff(
        runtime_paths(state_root, run_root), name, first, second, identity=identity
    )
    if as_json:
        click.echo(json.dumps(found.to_json(), indent=2))
        return
    for word, names in (
        ("added", found.added),
        ("removed", found.removed),
        ("changed", found.changed),
    ):
        for changed_name in names:
            click.echo(f"{word:<8}{shown(changed_name)}")
    if not (found.added or found.removed or found.changed):
        click.echo("no differences")
