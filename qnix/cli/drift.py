"""`qnix drift`: how this host differs from the live generation. Exit code 0 none, 1 some."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qnix.cli.options import runtime_options, runtime_paths


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
@runtime_options
@click.pass_context
def drift(
    ctx: click.Context, as_json: bool, state_root: Path | None, run_root: Path | None
) -> None:
    """Compare this host with the live generation: nft table, namespaces, links, routes,
    kernel parameters, running compartments and the generation's files. Exit code 1 if
    anything differs; `qnix apply` puts it back."""
    from qnix.runtime import drift as drift_module

    found = drift_module.drift(runtime_paths(state_root, run_root))
    if as_json:
        click.echo(json.dumps([difference.to_json() for difference in found], indent=2))
    else:
        for difference in found:
            click.echo(difference.render())
        count = len(found)
        click.echo(
            f"{count} difference{'s' if count != 1 else ''} from the live generation"
            if count
            else "no drift: the host matches the live generation"
        )
    ctx.exit(1 if found else 0)
