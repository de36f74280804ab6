"""`qnix` commands. Each is a few lines over the library; errors print without a traceback.

Imports are kept inside the commands: the CLI's start-up cost is paid on every `qnix run`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qnix import __version__
from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.spec.load import LoadedSpec

SPEC_ARG = click.argument("spec", type=click.Path(path_type=Path, dir_okay=False, exists=False))


class QnixGroup(click.Group):
    """Turns QnixError into a message, a hint and an exit code; `--debug` keeps the traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QnixError as exc:
            if ctx.meta.get("qnix.debug"):
                raise
            click.echo(exc.render(), err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=QnixGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qnix")
@click.option("--debug", is_flag=True, help="Show every command run and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Qubes-style compartments for NixOS and other Linux workstations."""
    ctx.meta["qnix.debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(spec: Path) -> LoadedSpec:
    from qnix.spec.load import load

    return load(spec)


@cli.command()
@SPEC_ARG
def check(spec: Path) -> None:
    """Validate SPEC: every problem is reported with its key path (exit code 2)."""
    loaded = _load(spec)
    ws = loaded.workstation
    levels: dict[str, int] = {}
    for compartment in ws.compartments.values():
        levels[compartment.isolation] = levels.get(compartment.isolation, 0) + 1
    summary = ", ".join(f"{count} {level}" for level, count in sorted(levels.items()))
    click.echo(
        f"{spec}: ok — host {ws.host.hostname} ({ws.host.system}, {ws.host.hardening}), "
        f"{len(ws.compartments)} compartments ({summary or 'none'}), "
        f"{len(ws.disposable_templates)} disposable templates, {len(ws.secrets)} secrets"
    )


@cli.command()
@SPEC_ARG
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the flake into (replaced as a whole).",
)
def build(spec: Path, output: Path) -> None:
    """Build SPEC into a NixOS flake in OUTPUT."""
    from rich.console import Console
    from rich.table import Table

    from qnix.compile.artifacts import compile_spec
    from qnix.runtime.files import replace_tree

    artifacts = compile_spec(_load(spec))
    replace_tree(output, artifacts.files)
    table = Table(title=f"{output} — generation {artifacts.generation[:16]}", title_justify="left")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256", style="dim")
    hashes = artifacts.manifest["files"]
    assert isinstance(hashes, dict)
    for path, data in artifacts.files.items():
        table.add_row(path, str(len(data)), str(hashes.get(path, ""))[:16])
    Console().print(table)


@cli.command()
@SPEC_ARG
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Picture to write: .svg, .png or .pdf (drawn by graphviz), or .dot for the source.",
)
def graph(spec: Path, output: Path) -> None:
    """Draw SPEC's compartments, network links and policy arrows with graphviz."""
    from qnix.compile.graph import policy_rules_of, render_dot
    from qnix.runtime.files import atomic_write, draw_with_graphviz

    fmt = output.suffix.lower().lstrip(".")
    if fmt not in ("dot", "svg", "png", "pdf"):
        raise QnixError(
            f"cannot draw {output.name!r}", hint="end the file name in .svg, .png, .pdf or .dot"
        )
    loaded = _load(spec)
    dot_source = render_dot(loaded.workstation, policy_rules_of(loaded))
    if fmt == "dot":
        atomic_write(output, dot_source.encode())
    else:
        draw_with_graphviz(dot_source, fmt, output)
    click.echo(f"wrote {output}")


def main() -> None:
    cli.main(prog_name="qnix")


if __name__ == "__main__":
    main()
