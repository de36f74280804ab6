"""`qnix integrity init|check`: record an AIDE baseline of this host, compare the files with it.

`check` exits 0 when nothing changed and 1 when anything did, after listing each file as
`added: PATH`, `removed: PATH` or `changed: PATH` (names escaped, see
qnix.runtime.integrity.printable). Errors print `error: ...` on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from qnix.cli.options import STATE_ROOT, runtime_paths

# Not qnix.cli.options.RUN_ROOT: its help says what init reads from the run root.
GENERATION_RUN_ROOT = click.option(
    "--run-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Runtime folder holding the live generation (default /run/qnix; QNIX_RUN_ROOT).",
)
CONFIG = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Use this aide.conf (e.g. a NixOS host's /etc/aide.conf) instead of qnix's own; "
    "its database_in and database_out must be file: URLs.",
)


@click.group()
def integrity() -> None:
    """AIDE integrity baseline of /etc, the live generation and the compartments' state."""


@integrity.command()
@STATE_ROOT
@GENERATION_RUN_ROOT
@CONFIG
@click.option(
    "--host-path",
    "host_paths",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Host folder to cover besides qnix's own (repeatable; default /etc).",
)
def init(
    state_root: Path | None,
    run_root: Path | None,
    config: Path | None,
    host_paths: tuple[Path, ...],
) -> None:
    """Record the baseline: write aide.conf for the live generation, check it, build the
    database and install it under <state root>/integrity."""
    from qnix.compile.aide import DEFAULT_HOST_PATHS
    from qnix.runtime import integrity as runtime

    if config is not None and host_paths:
        raise click.UsageError(
            "--host-path shapes qnix's own aide.conf; it has no effect on --config"
        )
    chosen = tuple(os.path.abspath(path) for path in host_paths) or DEFAULT_HOST_PATHS
    baseline = runtime.init(runtime_paths(state_root, run_root), host_paths=chosen, config=config)
    click.echo(
        f"integrity baseline of {baseline.entries} entries in {baseline.files.database}\n"
        f"  config: {baseline.files.config}\n"
        f"  database sha256: {baseline.database_sha256}"
    )


@integrity.command()
@STATE_ROOT
@CONFIG
@click.pass_context
def check(ctx: click.Context, state_root: Path | None, config: Path | None) -> None:
    """Compare the files with the baseline: list each one added, removed or changed (exit
    code 1), or say that nothing changed (exit code 0)."""
    from qnix.runtime import integrity as runtime

    findings = runtime.check(runtime_paths(state_root, None), config=config)
    for kind, names in (
        ("added", findings.added),
        ("removed", findings.removed),
        ("changed", findings.changed),
    ):
        for name in names:
            click.echo(f"{kind}: {runtime.printable(name)}")
    if findings.clean:
        click.echo(f"integrity: no changes in {findings.entries} entries")
        return
    click.echo(
        f"integrity: {len(findings.added)} added, {len(findings.removed)} removed, "
        f"{len(findings.changed)} changed"
    )
    ctx.exit(1)
