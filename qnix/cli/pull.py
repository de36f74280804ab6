"""`qnix pull`: follow a fleet repository's signed changes, rolling back a change that fails."""

from __future__ import annotations

from pathlib import Path

import click

from qnix.cli.options import runtime_options, runtime_paths
from qnix.errors import QnixError


@click.command()
@click.option("--init", "url", metavar="URL", help="Follow the fleet repository at URL.")
@click.option("--host", help="With --init: this host's name in fleet.toml.")
@click.option(
    "--signers",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="With --init: the allowed signers file (OpenSSH format) to trust.",
)
@click.option("--branch", default="main", show_default=True, help="With --init: the branch.")
@click.option(
    "--install-timer",
    is_flag=True,
    help="Install and start the systemd timer that runs `qnix pull` (after `make install`).",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("/"),
    show_default=True,
    help="With --install-timer: install into this folder as if it were / (as `qnix install`).",
)
@runtime_options
@click.pass_context
def pull(
    ctx: click.Context,
    url: str | None,
    host: str | None,
    signers: Path | None,
    branch: str,
    install_timer: bool,
    root: Path,
    state_root: Path | None,
    run_root: Path | None,
) -> None:
    """Fetch the fleet repository, verify every new commit against the pinned allowed signers,
    apply this host's spec and check it; a failing change is rolled back (docs/fleet.md).
    Exit code 0: applied or up to date; 1: refused or rolled back (the reason is printed)."""
    if install_timer:
        if url is not None or host is not None or signers is not None:
            raise QnixError("--install-timer goes alone (with --root at most)")
        from qnix.runtime.install import install_pull_timer

        outcome = install_pull_timer(root.absolute())
        for line in outcome.done:
            click.echo(line)
        for line in outcome.notes:
            click.echo(f"note: {line}")
        return
    if root != Path("/"):
        raise QnixError("--root goes with --install-timer")
    from qnix.runtime import pull as pulling

    paths = runtime_paths(state_root, run_root)
    if url is not None:
        if host is None or signers is None:
            raise QnixError("--init needs --host NAME and --signers FILE")
        pulling.init(paths, url, host, branch, signers)
        click.echo(f"following {url} ({branch}) as {host}; trusting the keys of {signers}")
        return
    if host is not None or signers is not None:
        raise QnixError("--host and --signers go with --init URL")
    result = pulling.pull(paths)
    short = result.commit[:12]
    if result.outcome == "up-to-date":
        click.echo(f"up to date at {short}")
    elif result.outcome == "applied":
        for change in result.changes:
            click.echo(change)
        click.echo(f"applied {short}")
    else:
        for change in result.changes:
            click.echo(change)
        click.echo(f"{result.outcome} {short}: {result.reason}", err=True)
        ctx.exit(1)
