"""`qnix install` and `qnix uninstall`: qnix's services on a systemd host that is not NixOS
(qnix.runtime.install; `make install` and `make uninstall` run them; docs/install.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from qnix.runtime.install import Outcome

ROOT = click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("/"),
    show_default=True,
    help="Install into this folder as if it were / (like `systemctl --root`).",
)


def _report(outcome: Outcome) -> None:
    for line in outcome.done:
        click.echo(line)
    for line in outcome.notes:
        click.echo(f"note: {line}")


@click.command()
@ROOT
@click.option(
    "--spec",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The spec whose audit forwarding (rsyslog) and AIDE configuration to install.",
)
def install(root: Path, spec: Path | None) -> None:
    """Install the qnix units (boot, gc and integrity timers, host key), tmpfiles rules, the
    rsyslog forwarding and AIDE configuration SPEC asks for, /usr/local/bin/qnix and the host's
    age identity; enable the units. qnix itself must already be in /opt/qnix (`make install`
    puts it there)."""
    from qnix.runtime.install import install as run_install

    _report(run_install(root.absolute(), spec=spec))


@click.command()
@ROOT
@click.option(
    "--purge",
    is_flag=True,
    help="Also remove the state root /var/lib/qnix (every compartment's home, the audit log) "
    "and the host identity.",
)
def uninstall(root: Path, purge: bool) -> None:
    """Remove everything `qnix install` put in place and /opt/qnix; the state root stays
    unless --purge."""
    from qnix.runtime.install import uninstall as run_uninstall

    _report(run_uninstall(root.absolute(), purge=purge))
