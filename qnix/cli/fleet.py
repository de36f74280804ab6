"""`qnix fleet check`: every host of a fleet repository, checked as `qnix check` checks one."""

from __future__ import annotations

from pathlib import Path

import click


def fleet_file(repository: Path) -> Path:
    """A fleet repository's fleet.toml, or the file itself when given one."""
    from qnix.fleet.inventory import FLEET_FILE

    return repository / FLEET_FILE if repository.is_dir() else repository


@click.group()
def fleet() -> None:
    """Many workstations from one git repository (docs/fleet.md)."""


@fleet.command()
@click.argument("repository", type=click.Path(path_type=Path, exists=True))
def check(repository: Path) -> None:
    """Validate every host of REPOSITORY (a folder with fleet.toml, or the file): each
    problem with the fleet file's key path that wrote it (exit code 2)."""
    from qnix.fleet.inventory import check_fleet, read_fleet

    path = fleet_file(repository)
    found = read_fleet(path)
    hosts = check_fleet(found)
    for name, loaded in hosts.items():
        entry = found.file.hosts[name]
        ws = loaded.workstation
        click.echo(
            f"{name}: ok — {ws.host.system}, {'NixOS' if entry.nixos else 'not NixOS'}, "
            f"roles {', '.join(entry.roles) or 'none'}, {len(ws.compartments)} compartments"
        )
    click.echo(f"{path}: ok — fleet {found.file.fleet.name}, {len(hosts)} hosts")
