"""A fleet's NixOS side: one flake for every NixOS host of the fleet file.

    flake.nix            nixosConfigurations.<host>, colmena and colmenaHive
    manifest.json        the fleet, its NixOS hosts and every file's sha256
    hosts/<host>/        exactly what `qnix build` writes for the host's spec
    comin/<host>.nix     the host's comin settings: pull the fleet repository's branch
    allowed_signers      the fleet's, which comin checks every new commit against

Each host's configuration is the single-host build's (its modules, from hosts/<host>/),
plus comin's module and the host's comin file. The colmena hive holds the same modules
for a push, each node tagged with its roles. Pure and deterministic: the same fleet file
gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from qnix import __version__
from qnix.compile.artifacts import MANIFEST, compile_spec, sha256
from qnix.compile.nix.files import render_file, render_module
from qnix.compile.nix.flake import FLAKE, flake_inputs, nixos_modules
from qnix.compile.nix.printer import Call, Function, NixValue, Raw, attr_name, path_literal
from qnix.errors import QnixError
from qnix.fleet.inventory import SIGNERS_FILE, Fleet, check_fleet
from qnix.spec.load import LoadedSpec

COMIN_URL = "github:nlewo/comin"
COLMENA_URL = "github:zhaofengli/colmena"
COMIN_REMOTE = "origin"
HOSTS_DIR = "hosts"
COMIN_DIR = "comin"
SIGNERS_ETC = "qnix/fleet-allowed-signers"


@dataclass(frozen=True, slots=True)
class FleetSource:
    """Where the hosts pull the fleet flake from: the repository, its branch, and the folder
    of the repository that holds the built flake."""

    remote: str
    branch: str = "main"
    flake_subdirectory: str = "."


def host_folder(name: str) -> str:
    return f"{HOSTS_DIR}/{name}"


def comin_file(name: str) -> str:
    return f"{COMIN_DIR}/{name}.nix"


def _follows_nixpkgs(url: str) -> dict[str, NixValue]:
    return {"inputs": {"nixpkgs": {"follows": "nixpkgs"}}, "url": url}


def _inputs(hosts: Mapping[str, LoadedSpec], file: str) -> dict[str, NixValue]:
    """The union of the hosts' inputs (one qnix for all), plus comin and colmena."""
    inputs: dict[str, NixValue] = {
        "colmena": _follows_nixpkgs(COLMENA_URL),
        "comin": _follows_nixpkgs(COMIN_URL),
    }
    for name, loaded in hosts.items():
        for input_name, value in flake_inputs(loaded.workstation).items():
            if inputs.setdefault(input_name, value) != value:
                raise QnixError(
                    f"{file}: host {name} needs input {input_name} from elsewhere than "
                    "the other hosts",
                    "give every NixOS host of the fleet the same host.qnix_flake",
                )
    return dict(sorted(inputs.items()))


def comin_module(name: str, source: FleetSource) -> dict[str, NixValue]:
    """The host's `services.comin`: follow `source`'s branch, evaluate its own name there,
    and take only commits the fleet's allowed signers signed."""
    return {
        "environment": {"etc": {SIGNERS_ETC: {"source": path_literal(SIGNERS_FILE, up=1)}}},
        "services": {
            "comin": {
                "enable": True,
                "hostname": name,
                "repositorySubdir": source.flake_subdirectory,
                # Pinned on the host by the deployed generation: a commit is taken only if the
                # signers the host already trusts signed it (as `qnix pull` does).
                "sshAllowedSignersPath": f"/etc/{SIGNERS_ETC}",
                "remotes": [
                    {
                        "name": COMIN_REMOTE,
                        "url": source.remote,
                        "branches": {"main": {"name": source.branch}},
                    }
                ],
            }
        },
    }


def fleet_flake_tree(fleet: Fleet, hosts: Mapping[str, LoadedSpec]) -> dict[str, NixValue]:
    inputs = _inputs(hosts, str(fleet.path))
    configurations: dict[str, NixValue] = {}
    host_outputs: dict[str, NixValue] = {}
    hive: dict[str, NixValue] = {}
    node_nixpkgs: dict[str, NixValue] = {}
    for name, loaded in hosts.items():
        ws = loaded.workstation
        folder = path_literal(host_folder(name))
        # The host's own flake, its `self` being itself: its nixosModules are the modules.
        flake_outputs = Raw(f"(import {path_literal(f'{host_folder(name)}/{FLAKE}').code}).outputs")
        own = f"self.qnixHosts.{attr_name(name)}"
        arguments: dict[str, NixValue] = {key: Raw(key) for key in flake_inputs(ws)}
        host_outputs[name] = Call(flake_outputs, {**arguments, "self": Raw(own)})
        modules = nixos_modules(ws, own, folder.code)
        configurations[name] = Call(
            Raw("nixpkgs.lib.nixosSystem"),
            {
                "modules": [
                    *modules,
                    Raw("comin.nixosModules.comin"),
                    path_literal(comin_file(name)),
                ]
            },
        )
        hive[name] = {
            "deployment": {"tags": list(fleet.file.hosts[name].roles)},
            "imports": modules,
        }
        node_nixpkgs[name] = Call(Raw("import nixpkgs"), {"system": ws.host.system})
    hive["meta"] = {
        "description": f"qnix fleet {fleet.file.fleet.name}",
        "name": fleet.file.fleet.name,
        "nixpkgs": Call(Raw("import nixpkgs"), {"system": "x86_64-linux"}),
        "nodeNixpkgs": node_nixpkgs,
    }
    outputs: dict[str, NixValue] = {
        "colmena": hive,
        "colmenaHive": Call(Raw("colmena.lib.makeHive"), Raw("self.colmena")),
        "nixosConfigurations": configurations,
        "qnixHosts": host_outputs,
    }
    return {
        "description": f"qnix fleet {fleet.file.fleet.name}",
        "inputs": inputs,
        "outputs": Function(("self", *inputs), outputs),
    }


def build_fleet(fleet: Fleet, source: FleetSource) -> dict[str, bytes]:
    """Every file of the fleet flake, by relative path; the fleet is checked first (a
    SpecError names every problem, as `qnix fleet check` does)."""
    checked = check_fleet(fleet)
    hosts = {name: checked[name] for name in sorted(checked) if fleet.file.hosts[name].nixos}
    if not hosts:
        raise QnixError(
            f"{fleet.path}: no host is NixOS", "set nixos = true (the default) on a host"
        )
    files: dict[str, bytes] = {FLAKE: render_file(fleet_flake_tree(fleet, hosts)).encode()}
    files[SIGNERS_FILE] = fleet.allowed_signers.read_bytes()
    for name, loaded in hosts.items():
        for path, data in compile_spec(loaded).files.items():
            files[f"{host_folder(name)}/{path}"] = data
        files[comin_file(name)] = render_module(comin_module(name, source)).encode()
    # Written last, it names what this build put there: the next build removes the rest.
    manifest = {
        "qnix_version": __version__,
        "fleet": fleet.file.fleet.name,
        "hosts": sorted(hosts),
        "files": {path: sha256(data) for path, data in sorted(files.items())},
    }
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return dict(sorted(files.items()))
