"""`qnix fleet check`, `build`, `init`: a fleet repository checked, built, or begun."""

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


@fleet.command()
@click.argument("repository", type=click.Path(path_type=Path, exists=True))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the fleet flake into.",
)
@click.option(
    "--remote", required=True, help="The URL the NixOS hosts pull the fleet from (comin)."
)
@click.option("--branch", default="main", show_default=True, help="The branch they follow.")
@click.option(
    "--subdirectory",
    default=".",
    show_default=True,
    help="The folder of the repository that holds the built flake (OUTPUT, as committed).",
)
def build(repository: Path, output: Path, remote: str, branch: str, subdirectory: str) -> None:
    """Build every NixOS host of REPOSITORY into one flake in OUTPUT: nixosConfigurations,
    a colmena hive, and each host's comin settings (docs/fleet.md)."""
    from qnix.compile.artifacts import MANIFEST, listed_files
    from qnix.fleet.build import FleetSource, build_fleet
    from qnix.fleet.inventory import read_fleet
    from qnix.runtime.files import update_tree

    found = read_fleet(fleet_file(repository))
    files = build_fleet(found, FleetSource(remote, branch, subdirectory))
    try:
        earlier = listed_files((output / MANIFEST).read_bytes())
    except (OSError, ValueError):
        earlier = ()  # no earlier build here (or not one whose list can be trusted)
    update_tree(output, files, stale=earlier, last=MANIFEST)
    hosts = [path.split("/")[1] for path in files if path.endswith("/manifest.json")]
    click.echo(f"{output}: fleet {found.file.fleet.name}, NixOS hosts {', '.join(hosts)}")


@fleet.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", default="acme", show_default=True, help="The fleet's name.")
@click.option(
    "--signer",
    "signers",
    multiple=True,
    metavar="LINE",
    help='An admin\'s allowed_signers line: "PRINCIPAL ssh-ed25519 AAAA..." (repeatable).',
)
def init(directory: Path, name: str, signers: tuple[str, ...]) -> None:
    """Write a starter fleet repository into DIRECTORY (new or empty): fleet.toml, policy.d/,
    allowed_signers, a Gitea Actions workflow and a pre-receive hook (docs/fleet.md)."""
    from qnix.errors import QnixError
    from qnix.fleet.starter import EXECUTABLE, starter_files
    from qnix.runtime.files import atomic_write

    files = starter_files(name, signers)
    if directory.exists() and any(directory.iterdir()):
        raise QnixError(f"{directory} is not empty", hint="choose a new or empty folder")
    for path, data in files.items():
        atomic_write(directory / path, data, 0o755 if path in EXECUTABLE else 0o644)
    click.echo(f"{directory}: fleet {name}, {len(files)} files")
    if not signers:
        click.echo("add the admins' keys to allowed_signers (qnix fleet check asks for one)")
