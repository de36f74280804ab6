"""`qnix` commands. Each is a few lines over the library; errors print without a traceback.

Imports are kept inside the commands: the CLI's start-up cost is paid on every `qnix run`.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qnix import __version__
from qnix.cli.audit import audit
from qnix.cli.broker import clip, copy, move, open_in_dvm
from qnix.cli.drift import drift
from qnix.cli.fleet import fleet
from qnix.cli.install import install, uninstall
from qnix.cli.integrity import integrity
from qnix.cli.options import runtime_options, runtime_paths
from qnix.cli.policy import policy
from qnix.cli.pull import pull
from qnix.cli.secret import secret
from qnix.cli.selftest import selftest
from qnix.cli.state import state
from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.runtime.status import Status
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
        except OSError as exc:  # a full disk, a missing permission: said, not a traceback
            if ctx.meta.get("qnix.debug"):
                raise
            click.echo(os_error(exc).render(), err=True)
            ctx.exit(1)


def os_error(exc: OSError) -> QnixError:
    """What failed on the host, as one line with a hint."""
    where = f": {exc.filename}" if exc.filename else ""
    hints = {
        errno.ENOSPC: "its file system is full: free space there (`df` shows which one)",
        errno.EACCES: "qnix needs root for this command",
        errno.EPERM: "qnix needs root for this command",
    }
    return QnixError(
        f"{exc.strerror or exc}{where}",
        hint=hints.get(exc.errno or 0, "`qnix --debug` shows where it happened"),
    )


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
    from qnix.compile.inputs import load

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
    help="Folder to write the flake into (what an earlier build wrote there is replaced; "
    "other files, such as flake.lock or .git, stay).",
)
def build(spec: Path, output: Path) -> None:
    """Build SPEC into a NixOS flake in OUTPUT."""
    from rich.console import Console
    from rich.table import Table

    from qnix.compile.artifacts import MANIFEST, compile_spec, listed_files
    from qnix.runtime.files import update_tree

    artifacts = compile_spec(_load(spec))
    try:
        earlier = listed_files((output / MANIFEST).read_bytes())
    except (OSError, ValueError):
        earlier = ()  # no earlier build here (or not one whose list can be trusted)
    update_tree(output, artifacts.files, stale=earlier, last=MANIFEST)
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


# ---- the host's compartments ------------------------------------------------------------

NAME_ARG = click.argument("name")


def _echo_changes(changes: Sequence[str], nothing: str = "no changes") -> None:
    for change in changes:
        click.echo(change)
    if not changes:
        click.echo(nothing)


@cli.command()
@SPEC_ARG
@runtime_options
@click.option("--purge", is_flag=True, help="Also delete the state of compartments removed.")
def apply(spec: Path, state_root: Path | None, run_root: Path | None, purge: bool) -> None:
    """Bring this host to SPEC: namespaces, links, the nft table, state, autostart."""
    from qnix.runtime import reconcile

    result = reconcile.apply(runtime_paths(state_root, run_root), _load(spec), purge=purge)
    _echo_changes(result.changes)
    for note in result.notes:
        click.echo(f"note: {note}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command()
@runtime_options
@click.option(
    "--generation",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Install the generation `qnix build` wrote into this folder (its manifest's files, "
    "checked) and boot from it; the NixOS module passes the flake's own.",
)
def boot(state_root: Path | None, run_root: Path | None, generation: Path | None) -> None:
    """Bring this host up from the installed generation after a reboot (the boot unit runs
    it): a clean start, whatever /run still holds; needs no spec file."""
    from qnix.runtime import reconcile

    paths = runtime_paths(state_root, run_root)
    result = reconcile.boot(paths, generation)
    if result is None:
        click.echo(
            f"nothing to do: no generation is installed under {paths.installed_dir} "
            "(qnix apply SPEC installs one)"
        )
        return
    _echo_changes(result.changes)
    click.echo(f"booted generation {result.generation[:16]}")
    for note in result.notes:
        click.echo(f"note: {note}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


def _format_memory(status: Status) -> str:
    if status.memory_used is None:
        return f"{status.memory_mb} MiB"
    return f"{status.memory_used >> 20}/{status.memory_mb} MiB"


@cli.command(name="ls")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
def ls(state_root: Path | None, run_root: Path | None, as_json: bool) -> None:
    """List the compartments of the live generation and their state."""
    import json

    from qnix.runtime.status import statuses

    found = statuses(runtime_paths(state_root, run_root))
    if as_json:
        click.echo(json.dumps([status.to_json() for status in found], indent=2))
        return
    rows = [("NAME", "LABEL", "ISOLATION", "STATE", "NETWORK", "ADDRESS", "MEMORY")]
    for status in found:
        address = f"{status.address}/31" if status.address else "-"
        rows.append(
            (
                status.name,
                status.label,
                status.isolation,
                status.state,
                status.network,
                address,
                _format_memory(status),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@cli.command()
@NAME_ARG
@runtime_options
def start(name: str, state_root: Path | None, run_root: Path | None) -> None:
    """Start compartment NAME."""
    from qnix.runtime import lifecycle

    started = lifecycle.start(runtime_paths(state_root, run_root), name)
    click.echo(f"{name}: started" if started else f"{name}: already running")


@cli.command()
@NAME_ARG
@runtime_options
def stop(name: str, state_root: Path | None, run_root: Path | None) -> None:
    """Stop compartment NAME (SIGTERM to its processes, SIGKILL after a grace period)."""
    from qnix.runtime import lifecycle

    stopped = lifecycle.stop(runtime_paths(state_root, run_root), name)
    click.echo(f"{name}: stopped" if stopped else f"{name}: not running")


@cli.command()
@NAME_ARG
@runtime_options
def restart(name: str, state_root: Path | None, run_root: Path | None) -> None:
    """Stop compartment NAME if it runs, then start it."""
    from qnix.runtime import lifecycle

    lifecycle.restart(runtime_paths(state_root, run_root), name)
    click.echo(f"{name}: restarted")


@cli.command(context_settings={"ignore_unknown_options": True})
@NAME_ARG
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@runtime_options
@click.option("--user", "-u", help="The user to run as: only the compartment's user exists.")
@click.option(
    "--gui", is_flag=True, help="A GUI app: NAME must have gui = true (Wayland only, docs/gui.md)."
)
@click.pass_context
def run(
    ctx: click.Context,
    name: str,
    command: tuple[str, ...],
    state_root: Path | None,
    run_root: Path | None,
    user: str | None,
    gui: bool,
) -> None:
    """Run COMMAND in compartment NAME with this terminal's input and output; exit with its
    exit code. NAME is started first if it is not running. Put `--` before COMMAND."""
    from qnix.runtime import lifecycle

    paths = runtime_paths(state_root, run_root)
    ctx.exit(lifecycle.run(paths, name, command, user, gui=gui))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@runtime_options
@click.option(
    "--template", "-t", help="Disposable template (default: the spec's default_disposable)."
)
@click.option(
    "--gui",
    "gui_template",
    metavar="TEMPLATE",
    help="COMMAND is a GUI app, in a disposable of TEMPLATE, which must have gui = true "
    "(Wayland only, docs/gui.md).",
)
@click.pass_context
def dispose(
    ctx: click.Context,
    command: tuple[str, ...],
    state_root: Path | None,
    run_root: Path | None,
    template: str | None,
    gui_template: str | None,
) -> None:
    """Run COMMAND in a fresh disposable compartment with this terminal's input and output;
    when it ends, nothing of the disposable is left. Put `--` before COMMAND."""
    from qnix.runtime import disposables

    if gui_template is not None and template not in (None, gui_template):
        raise click.BadParameter(
            f"--gui {gui_template} and --template {template} name two templates",
            param_hint="--gui",
        )
    paths = runtime_paths(state_root, run_root)
    chosen = gui_template or template
    ctx.exit(disposables.dispose(paths, command, chosen, gui=gui_template is not None))


@cli.command()
@runtime_options
def down(state_root: Path | None, run_root: Path | None) -> None:
    """Stop every compartment and remove qnix's runtime from this host; keep the state."""
    from qnix.runtime import reconcile

    _echo_changes(reconcile.down(runtime_paths(state_root, run_root)), "nothing to remove")


@cli.command()
@runtime_options
def gc(state_root: Path | None, run_root: Path | None) -> None:
    """Remove what a crash left behind: namespaces, links, cgroups, files, nft leftovers."""
    from qnix.runtime import reconcile

    _echo_changes(reconcile.gc(runtime_paths(state_root, run_root)), "nothing to remove")


cli.add_command(policy)
cli.add_command(secret)
cli.add_command(state)
cli.add_command(copy)
cli.add_command(move)
cli.add_command(clip)
cli.add_command(open_in_dvm)
cli.add_command(audit)
cli.add_command(drift)
cli.add_command(integrity)
cli.add_command(install)
cli.add_command(fleet)
cli.add_command(pull)
cli.add_command(uninstall)
cli.add_command(selftest)


if __name__ == "__main__":
    cli.main(prog_name="qnix")
