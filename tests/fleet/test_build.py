"""`qnix fleet build`: one flake for the fleet's NixOS hosts, each host's folder exactly what
`qnix build` gives for its spec; a colmena hive tagged by roles and a comin file per host whose
option names are those comin and colmena declare (tests/data/fleet-deploy-options.tsv); the
same bytes for the same repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.artifacts import compile_spec
from qnix.compile.nix.printer import Call, Raw
from qnix.errors import QnixError
from qnix.fleet.build import FleetSource, build_fleet, comin_module, fleet_flake_tree
from qnix.fleet.inventory import check_fleet, host_spec, read_fleet
from tests.compile.nix import reference
from tests.compile.nix.support import nix_eval, nix_parse
from tests.conftest import DATA, EXAMPLES

FLEET = EXAMPLES / "fleet"
QNIX = str(Path(sys.executable).with_name("qnix"))
DEPLOY_OPTIONS = DATA / "fleet-deploy-options.tsv"
REMOTE = "ssh://git@git.acme.example/acme/fleet.git"
SOURCE = FleetSource(REMOTE)


def deploy_options() -> dict[str, str]:
    """name -> type of tests/data/fleet-deploy-options.tsv."""
    options = {}
    for line in DEPLOY_OPTIONS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, type_text = line.split("\t")
        options[name] = type_text
    return options


def option_paths(tree: Mapping[str, Any], known: Mapping[str, str], at: str = "") -> list[str]:
    """Each option the tree sets, down to its leaves, as the reference names it: a list of
    attribute sets is a list of submodules (`NAME.*`), `environment.etc.NAME` is `<name>`, and
    an option of a type that takes any value (`unspecified`) is a leaf."""
    found = []
    for key, value in tree.items():
        here = f"{at}.<name>" if at == "environment.etc" else (f"{at}.{key}" if at else key)
        if isinstance(value, Mapping) and "unspecified" not in known.get(here, ""):
            found += option_paths(value, known, here)
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            found.append(here)
            for item in value:
                found += option_paths(item, known, f"{here}.*")
        else:
            found.append(here)
    return sorted(set(found))


def test_each_host_folder_is_what_qnix_build_gives_for_the_host_spec() -> None:
    fleet = read_fleet(FLEET / "fleet.toml")
    files = build_fleet(fleet, SOURCE)
    for name in ("desk-01", "desk-02", "desk-03"):
        single = compile_spec(host_spec(fleet, name)).files
        prefix = f"hosts/{name}/"
        part = {
            path[len(prefix) :]: data for path, data in files.items() if path.startswith(prefix)
        }
        assert part == dict(single)
    # desk-04 and desk-05 are not NixOS: they follow the repository with qnix pull.
    assert {path.split("/")[1] for path in files if path.startswith("hosts/")} == {
        "desk-01",
        "desk-02",
        "desk-03",
    }
    assert files["allowed_signers"] == (FLEET / "allowed_signers").read_bytes()


def test_the_same_repository_builds_the_same_bytes_twice(tmp_path: Path) -> None:
    outputs = []
    for run_name in ("one", "two"):
        out = tmp_path / run_name
        done = subprocess.run(
            [QNIX, "fleet", "build", str(FLEET), "-o", str(out), "--remote", REMOTE],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{out}: fleet acme, NixOS hosts desk-01, desk-02, desk-03\n"
        outputs.append(
            {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        )
    assert outputs[0] == outputs[1]
    assert outputs[0] == build_fleet(read_fleet(FLEET / "fleet.toml"), SOURCE)


def test_every_nix_file_parses_and_the_comin_settings_evaluate(tmp_path: Path) -> None:
    files = build_fleet(read_fleet(FLEET / "fleet.toml"), FleetSource(REMOTE, "stable", "built"))
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    nix_parse(sorted(tmp_path.rglob("*.nix")))
    probe = tmp_path / "probe.nix"
    probe.write_text(
        "(import ./comin/desk-02.nix { config = { }; lib = { }; pkgs = { }; }).services.comin\n"
    )
    assert nix_eval(probe) == {
        "enable": True,
        "hostname": "desk-02",
        "remotes": [{"branches": {"main": {"name": "stable"}}, "name": "origin", "url": REMOTE}],
        "repositorySubdir": "built",
        "sshAllowedSignersPath": "/etc/qnix/fleet-allowed-signers",
    }


def test_a_hostile_remote_reaches_comin_as_the_same_string(tmp_path: Path) -> None:
    remote = 'x"; }; services.openssh.enable = true; ${builtins.abort "x"} \\'
    (tmp_path / "comin").mkdir()
    fleet = read_fleet(FLEET / "fleet.toml")
    files = build_fleet(fleet, FleetSource(remote, 'a"b${c}'))
    for path in ("comin/desk-01.nix", "allowed_signers"):
        (tmp_path / path).write_bytes(files[path])
    probe = tmp_path / "probe.nix"
    probe.write_text(
        "(import ./comin/desk-01.nix { config = { }; lib = { }; pkgs = { }; })"
        ".services.comin.remotes\n"
    )
    assert nix_eval(probe) == [
        {"branches": {"main": {"name": 'a"b${c}'}}, "name": "origin", "url": remote}
    ]


def test_the_comin_file_is_exactly_this() -> None:
    files = build_fleet(read_fleet(FLEET / "fleet.toml"), SOURCE)
    assert files["comin/desk-03.nix"].decode().split("\n", 1)[1] == (
        "{ config, lib, pkgs, ... }:\n"
        "{\n"
        "  environment = {\n"
        "    etc = {\n"
        '      "qnix/fleet-allowed-signers" = {\n'
        "        source = (../allowed_signers);\n"
        "      };\n"
        "    };\n"
        "  };\n"
        "  services = {\n"
        "    comin = {\n"
        "      enable = true;\n"
        '      hostname = "desk-03";\n'
        "      remotes = [\n"
        "        {\n"
        "          branches = {\n"
        "            main = {\n"
        '              name = "main";\n'
        "            };\n"
        "          };\n"
        '          name = "origin";\n'
        '          url = "ssh://git@git.acme.example/acme/fleet.git";\n'
        "        }\n"
        "      ];\n"
        '      repositorySubdir = ".";\n'
        '      sshAllowedSignersPath = "/etc/qnix/fleet-allowed-signers";\n'
        "    };\n"
        "  };\n"
        "}\n"
    )


def test_comin_option_names_are_those_comin_and_nixos_declare() -> None:
    comin = deploy_options()
    nixos = dict(reference.tsv_lines(reference.AUDIT_OPTIONS_TSV))
    paths = option_paths(comin_module("desk-01", SOURCE), {**comin, **nixos})
    assert paths == [
        "environment.etc.<name>.source",
        "services.comin.enable",
        "services.comin.hostname",
        "services.comin.remotes",
        "services.comin.remotes.*.branches.main.name",
        "services.comin.remotes.*.name",
        "services.comin.remotes.*.url",
        "services.comin.repositorySubdir",
        "services.comin.sshAllowedSignersPath",
    ]
    assert nixos["environment.etc.<name>.source"] == "absolute path"
    assert [path for path in paths if path not in comin] == ["environment.etc.<name>.source"]
    assert comin["services.comin.sshAllowedSignersPath"] == "nullOr str"
    # The control: a name comin does not declare (renamed away) is caught by the same walk.
    stale = {"services": {"comin": {"flakeSubdirectory": "."}}}
    assert option_paths(stale, comin) == ["services.comin.flakeSubdirectory"]
    assert "services.comin.flakeSubdirectory" not in comin


def test_the_colmena_hive_tags_each_node_with_its_roles() -> None:
    fleet = read_fleet(FLEET / "fleet.toml")
    hosts = {n: s for n, s in check_fleet(fleet).items() if fleet.file.hosts[n].nixos}
    tree = fleet_flake_tree(fleet, hosts)
    outputs = tree["outputs"].body  # type: ignore[union-attr]
    hive = outputs["colmena"]
    assert outputs["colmenaHive"] == Call(Raw("colmena.lib.makeHive"), Raw("self.colmena"))
    assert {name: node["deployment"]["tags"] for name, node in hive.items() if name != "meta"} == {
        "desk-01": ["office"],
        "desk-02": ["office", "developer"],
        "desk-03": ["office", "finance"],
    }
    known = deploy_options()
    written = option_paths({"meta": hive["meta"]}, known)
    written += [
        p
        for n, node in hive.items()
        if n != "meta"
        for p in option_paths({"deployment": node["deployment"]}, known)
    ]
    assert set(written) <= set(known)
    for name, node in hive.items():
        if name == "meta":
            assert option_paths({"meta": node}, known) == [
                "meta.description",
                "meta.name",
                "meta.nixpkgs",
                "meta.nodeNixpkgs",
            ]
        else:
            assert option_paths({"deployment": node["deployment"]}, known) == ["deployment.tags"]
            # The node's modules are the host's configuration's, before comin's.
            configuration = outputs["nixosConfigurations"][name].argument["modules"]
            assert node["imports"] == configuration[: len(node["imports"])]
            assert configuration[len(node["imports"]) :] == [
                Raw("comin.nixosModules.comin"),
                Raw(f"./comin/{name}.nix"),
            ]
    assert sorted(tree["inputs"]) == ["colmena", "comin", "disko", "nixpkgs", "qnix"]


def test_a_host_that_leaves_is_removed_by_the_next_build(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    shutil.copytree(FLEET, folder)
    out = tmp_path / "out"
    command = [QNIX, "fleet", "build", str(folder), "-o", str(out), "--remote", REMOTE]
    subprocess.run(command, check=True, capture_output=True)
    (out / "flake.lock").write_text("{}\n")  # not the build's: it stays
    assert (out / "hosts/desk-01/flake.nix").is_file()
    path = folder / "fleet.toml"
    path.write_text(
        path.read_text().replace('roles = ["office"]\n', 'roles = ["office"]\nnixos = false\n', 1)
    )
    subprocess.run(command, check=True, capture_output=True)
    assert not (out / "hosts/desk-01").exists()
    assert not (out / "comin/desk-01.nix").exists()
    assert (out / "hosts/desk-02/flake.nix").is_file()
    assert (out / "flake.lock").read_text() == "{}\n"


def test_a_fleet_with_a_problem_builds_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    shutil.copytree(FLEET, folder)
    path = folder / "fleet.toml"
    path.write_text(path.read_text().replace("memory_mb = 1024", 'memory_mb = "1024"'))
    out = tmp_path / "out"
    done = subprocess.run(
        [QNIX, "fleet", "build", str(folder), "-o", str(out), "--remote", REMOTE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "hosts.desk-02.overrides.compartments.dev.memory_mb" in done.stderr + done.stdout
    assert not out.exists()
    # The control: the same folder without the mistake builds.
    path.write_text(path.read_text().replace('memory_mb = "1024"', "memory_mb = 1024"))
    done = subprocess.run(
        [QNIX, "fleet", "build", str(folder), "-o", str(out), "--remote", REMOTE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_hosts_that_disagree_on_the_qnix_flake_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    shutil.copytree(FLEET, folder)
    path = folder / "fleet.toml"
    text = path.read_text().replace(
        "[hosts.desk-01]\n", '[hosts.desk-01]\noverrides.host.qnix_flake = "github:acme/qnix"\n'
    )
    path.write_text(text)
    with pytest.raises(QnixError, match="host desk-02 needs input qnix from elsewhere"):
        build_fleet(read_fleet(path), SOURCE)


# The fleet flake's outputs with stand-ins for its inputs (no nixpkgs, comin or colmena here):
# what is wired to what, each host's own flake imported with itself as `self`.
WIRING_PROBE = """\
let
  flake = import ./flake.nix;
  inputs = {
    nixpkgs = { outPath = ./stand-in; lib.nixosSystem = args: args; };
    colmena.lib.makeHive = hive: { made = builtins.attrNames hive; };
    disko.nixosModules.disko = "disko";
    qnix.nixosModules.qnix = "qnix";
    comin.nixosModules.comin = "comin";
  };
  self = flake.outputs (inputs // { inherit self; });
  nodes = removeAttrs self.colmena [ "meta" ];
  configs = self.nixosConfigurations;
  at = builtins.elemAt;
  generation = modules: toString (at modules 3).services.qnix.generation;
in {
  tags = builtins.mapAttrs (n: node: node.deployment.tags) nodes;
  hive = self.colmenaHive;
  nodeNixpkgs = self.colmena.meta.nodeNixpkgs;
  ownModules = builtins.mapAttrs (n: c:
    builtins.head c.modules == self.qnixHosts.${n}.nixosModules.default) configs;
  nodeModules = builtins.mapAttrs (n: node:
    builtins.head node.imports == self.qnixHosts.${n}.nixosModules.default) nodes;
  rest = builtins.mapAttrs (n: c:
    [ (at c.modules 1) (at c.modules 2) (at c.modules 4) (baseNameOf (at c.modules 5)) ]) configs;
  generations = builtins.mapAttrs (n: c: baseNameOf (generation c.modules)) configs;
  hostConfigurations = builtins.mapAttrs (n: h: builtins.attrNames h.nixosConfigurations)
    self.qnixHosts;
}
"""


def test_the_fleet_flake_wires_each_host_to_its_own_folder(tmp_path: Path) -> None:
    files = build_fleet(read_fleet(FLEET / "fleet.toml"), SOURCE)
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    (tmp_path / "stand-in").mkdir()
    (tmp_path / "stand-in/default.nix").write_text("{ system }: { standInFor = system; }\n")
    (tmp_path / "probe.nix").write_text(WIRING_PROBE)
    hosts = ("desk-01", "desk-02", "desk-03")
    assert nix_eval(tmp_path / "probe.nix") == {
        "tags": {
            "desk-01": ["office"],
            "desk-02": ["office", "developer"],
            "desk-03": ["office", "finance"],
        },
        "hive": {"made": [*hosts, "meta"]},
        "nodeNixpkgs": {host: {"standInFor": "x86_64-linux"} for host in hosts},
        "ownModules": dict.fromkeys(hosts, True),
        "nodeModules": dict.fromkeys(hosts, True),
        "rest": {host: ["disko", "qnix", "comin", f"{host}.nix"] for host in hosts},
        "generations": {host: host for host in hosts},
        "hostConfigurations": {host: [host] for host in hosts},
    }
