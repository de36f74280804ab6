"""The flake: `nixosModules.<concern>` (one file each under modules/), `nixosModules.default`
importing them all, and `nixosConfigurations.<hostname>`.

Inputs are only what the spec needs: lanzaboote with Secure Boot, microvm.nix with VMs; and
qnix itself (`host.qnix_flake`), whose `nixosModules.qnix` runs the qnix services on the host,
booting from this flake's own folder as the generation.
"""

from __future__ import annotations

from qnix.compile.nix.files import render_file, render_module
from qnix.compile.nix.modules import CONCERNS, module_trees
from qnix.compile.nix.printer import Call, Function, NixValue, Raw
from qnix.compile.nix.vms import vms
from qnix.spec.model import Workstation

NIXPKGS_URL = "github:NixOS/nixpkgs/nixos-25.11"
DISKO_URL = "github:nix-community/disko"
LANZABOOTE_URL = "github:nix-community/lanzaboote/v1.0.0"
MICROVM_URL = "github:microvm-nix/microvm.nix"

FLAKE = "flake.nix"


def module_path(concern: str) -> str:
    return f"modules/{concern}.nix"


def _follows_nixpkgs(url: str) -> dict[str, NixValue]:
    return {"inputs": {"nixpkgs": {"follows": "nixpkgs"}}, "url": url}


def flake_inputs(ws: Workstation) -> dict[str, NixValue]:
    """The flake inputs the host's configuration needs, by name."""
    inputs: dict[str, NixValue] = {
        "disko": _follows_nixpkgs(DISKO_URL),
        "nixpkgs": {"url": NIXPKGS_URL},
        "qnix": _follows_nixpkgs(ws.host.qnix_flake),
    }
    if ws.host.secure_boot:
        inputs["lanzaboote"] = _follows_nixpkgs(LANZABOOTE_URL)
    if vms(ws):
        inputs["microvm"] = _follows_nixpkgs(MICROVM_URL)
    return dict(sorted(inputs.items()))


def nixos_modules(ws: Workstation, modules_of: str, folder: str) -> list[NixValue]:
    """The modules of the host's `nixosSystem`: `modules_of` is the Nix expression holding
    its `nixosModules` (`self`), `folder` the path literal of the flake's own folder (`./.`).
    Both are code qnix writes, never spec text."""
    modules: list[NixValue] = [
        Raw(f"{modules_of}.nixosModules.default"),
        Raw("disko.nixosModules.disko"),
        Raw("qnix.nixosModules.qnix"),
        # The flake's own folder is the generation (manifest.json and the files it lists): the
        # boot unit installs it and brings the host to it. `./.`, not `self`: in a git
        # repository with the flake in a subfolder, `self` is the repository's root.
        {"services": {"qnix": {"enable": True, "generation": Raw(folder)}}},
    ]
    if ws.host.secure_boot:
        modules.append(Raw("lanzaboote.nixosModules.lanzaboote"))
    if vms(ws):
        modules.append(Raw("microvm.nixosModules.host"))
    return modules


def flake_tree(ws: Workstation) -> dict[str, NixValue]:
    inputs = flake_inputs(ws)
    params = ["self", "nixpkgs", "disko", "qnix"]
    params += [name for name in ("lanzaboote", "microvm") if name in inputs]
    modules = nixos_modules(ws, "self", "./.")

    paths = {concern: Raw(f"./{module_path(concern)}") for concern in CONCERNS}
    outputs: dict[str, NixValue] = {
        "nixosConfigurations": {
            ws.host.hostname: Call(Raw("nixpkgs.lib.nixosSystem"), {"modules": modules})
        },
        "nixosModules": {**paths, "default": {"imports": list(paths.values())}},
    }
    return {
        "description": f"qnix workstation {ws.host.hostname}",
        "inputs": inputs,
        "outputs": Function(tuple(params), outputs),
    }


def render_nix_files(ws: Workstation, nft_table_body: str) -> dict[str, str]:
    """All .nix files of the flake, keyed by relative path: "flake.nix" and
    "modules/<concern>.nix"."""
    files = {FLAKE: render_file(flake_tree(ws))}
    for concern, config in module_trees(ws, nft_table_body).items():
        files[module_path(concern)] = render_module(config)
    return files
