"""The overlay's generated files, exactly: a compartment's and a server's Nebula configuration,
the Tailscale policy, the NixOS tailscale settings; and the real nebula reading the Nebula
files with certificates the real nebula-cert signed."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import load
from qnix.compile.nix.modules import network_module
from qnix.compile.nix.printer import Function
from qnix.compile.overlay import (
    TAILSCALE_POLICY,
    compartment_config_file,
    render_yaml,
    server_config_file,
    tailscale_containers,
)
from qnix.spec.model import Workstation
from tests.conftest import DATA, need

SPEC = DATA / "specs" / "overlay.toml"
TAILSCALE_OPTIONS = DATA / "tailscale-options.tsv"

WORK_YML = """\
pki:
  ca: ca.crt
  cert: host.crt
  key: host.key
static_host_map:
  "10.42.0.1":
    - "203.0.113.1:4242"
lighthouse:
  am_lighthouse: false
  interval: 60
  hosts:
    - "10.42.0.1"
listen:
  host: "0.0.0.0"
  port: 0
punchy:
  punch: true
tun:
  dev: nebula1
  drop_local_broadcast: true
  drop_multicast: true
  mtu: 1300
logging:
  format: text
  level: info
firewall:
  outbound:
    - port: 445
      proto: tcp
      cidr: "10.42.0.1/32"
    - port: "8000-8010"
      proto: tcp
      cidr: "10.42.0.1/32"
    - port: 443
      proto: tcp
      cidr: "10.42.0.1/32"
    - port: any
      proto: icmp
      cidr: "10.42.0.1/32"
  inbound: []
"""

OFFICE_YML = """\
pki:
  ca: ca.crt
  cert: host.crt
  key: host.key
static_host_map: {}
lighthouse:
  am_lighthouse: true
listen:
  host: "0.0.0.0"
  port: 4242
punchy:
  punch: true
tun:
  dev: nebula1
  drop_local_broadcast: true
  drop_multicast: true
  mtu: 1300
logging:
  format: text
  level: info
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: 445
      proto: tcp
      group: work
    - port: "8000-8010"
      proto: tcp
      group: work
    - port: 445
      proto: tcp
      group: finance
    - port: "8000-8010"
      proto: tcp
      group: finance
    - port: 443
      proto: tcp
      group: staff
    - port: any
      proto: icmp
      group: staff
"""

POLICY_HEADER = """\
// The tailnet policy of workstation desk-07's compartments, written by
// qnix from its spec: edit the spec, not this file. Give each compartment's node
// its tag:qnix-<compartment> and each server's node its tag:server-<server>.
"""


def _accept(src: str, proto: str, dst: str) -> dict[str, object]:
    return {"action": "accept", "src": [src], "proto": proto, "dst": [dst]}


POLICY = {
    "tagOwners": {
        "tag:qnix-personal": ["autogroup:admin"],
        "tag:qnix-work": ["autogroup:admin"],
        "tag:server-office": ["autogroup:admin"],
    },
    "acls": [
        _accept("tag:qnix-personal", "tcp", "tag:server-office:443"),
        _accept("tag:qnix-personal", "icmp", "tag:server-office:*"),
        _accept("tag:qnix-work", "tcp", "tag:server-office:445,8000-8010"),
        _accept("tag:qnix-work", "tcp", "tag:server-office:443"),
        _accept("tag:qnix-work", "icmp", "tag:server-office:*"),
    ],
    "tests": [
        {
            "src": "tag:qnix-personal",
            "accept": ["tag:server-office:443"],
            "deny": ["tag:server-office:445"],
        },
        {"src": "tag:qnix-work", "accept": ["tag:server-office:445", "tag:server-office:443"]},
    ],
}


def workstation() -> Workstation:
    return load(SPEC).workstation


def built() -> dict[str, str]:
    files = compile_spec(load(SPEC)).files
    return {path: data.decode() for path, data in files.items() if not path.endswith(".age")}


def test_the_build_holds_the_overlay_files_and_only_for_members() -> None:
    overlay = sorted(path for path in built() if path.startswith("overlay/"))
    assert overlay == [
        "overlay/nebula/compartments/personal.yml",
        "overlay/nebula/compartments/work.yml",
        "overlay/nebula/servers/office.yml",
        "overlay/tailscale-policy.hujson",
    ]


def test_a_compartment_reaches_what_the_servers_admit_for_its_groups_and_nothing_reaches_it() -> (
    None
):
    assert built()[compartment_config_file("work")] == WORK_YML
    personal = built()[compartment_config_file("personal")]
    # personal is staff only: the web page and ping, not the file share.
    assert personal.split("firewall:\n")[1] == (
        "  outbound:\n"
        '    - port: 443\n      proto: tcp\n      cidr: "10.42.0.1/32"\n'
        '    - port: any\n      proto: icmp\n      cidr: "10.42.0.1/32"\n'
        "  inbound: []\n"
    )


def test_the_server_admits_each_group_of_a_rule_by_a_rule_of_its_own() -> None:
    assert built()[server_config_file("office")] == OFFICE_YML


def test_the_tailscale_policy_has_a_tag_per_compartment_and_its_destinations() -> None:
    text = built()[TAILSCALE_POLICY]
    assert text.startswith(POLICY_HEADER)
    assert json.loads(text.removeprefix(POLICY_HEADER)) == POLICY


def test_nixos_runs_tailscale_inside_the_container_never_on_the_host() -> None:
    ws = workstation()
    tailscale = {
        "authKeyFile": "/run/secrets/tailscale-work",
        "enable": True,
        "extraUpFlags": ["--advertise-tags=tag:qnix-work"],
    }
    assert tailscale_containers(ws) == {
        "work": {
            "config": Function(("pkgs",), {"services": {"tailscale": tailscale}}),
            "enableTun": True,
        }
    }
    module = network_module(ws, "")
    assert module["containers"] == tailscale_containers(ws)
    assert "services" not in module  # nothing of tailscale on the host itself


def test_headscale_is_the_login_server_when_the_spec_names_one() -> None:
    text = SPEC.read_text().replace(
        'subnet = "10.42.0.0/24"',
        'subnet = "10.42.0.0/24"\nlogin_server = "https://headscale.example.com"',
    )
    ws = Workstation.model_validate(tomllib.loads(text))
    config = tailscale_containers(ws)["work"]
    assert isinstance(config, dict)
    function = config["config"]
    assert isinstance(function, Function)
    assert function.body == {
        "services": {
            "tailscale": {
                "authKeyFile": "/run/secrets/tailscale-work",
                "enable": True,
                "extraUpFlags": [
                    "--advertise-tags=tag:qnix-work",
                    "--login-server=https://headscale.example.com",
                ],
            }
        }
    }


def _paths(value: object, prefix: str) -> set[str]:
    if isinstance(value, Function):
        return _paths(value.body, prefix)
    if isinstance(value, dict):
        found: set[str] = set()
        for key, item in value.items():
            found |= _paths(item, f"{prefix}.{key}" if prefix else key)
        return found
    return {prefix}


def test_every_tailscale_option_written_is_declared() -> None:
    declared = {
        line.split("\t")[0]
        for line in TAILSCALE_OPTIONS.read_text().splitlines()
        if line and not line.startswith("#")
    }
    written = set()
    for container in tailscale_containers(workstation()).values():
        for path in _paths(container, ""):
            inside = path.removeprefix("config.")  # an option of the container's own NixOS
            written.add(inside if inside != path else f"containers.<name>.{path}")
    assert written == {
        "containers.<name>.enableTun",
        "services.tailscale.authKeyFile",
        "services.tailscale.enable",
        "services.tailscale.extraUpFlags",
    }
    assert written <= declared


def test_yaml_quotes_what_yaml_would_read_as_something_else() -> None:
    assert render_yaml({"a": "yes", "b": "8000-8010", "c": "10.0.0.1", "d": "any"}) == (
        'a: "yes"\nb: "8000-8010"\nc: "10.0.0.1"\nd: any\n'
    )
    assert render_yaml({"e": 'say "hi"\n', "f": [], "g": {}}) == (
        'e: "say \\"hi\\"\\n"\nf: []\ng: {}\n'
    )


def _nebula_test(folder: Path, config: str, name: str, ip: str, groups: str) -> str:
    cert = need("nebula-cert")
    subprocess.run(
        [cert, "sign", "-ca-crt", "ca.crt", "-ca-key", "ca.key", "-name", name, "-ip", ip,
         "-groups", groups, "-out-crt", "host.crt", "-out-key", "host.key"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    (folder / "config.yml").write_text(config)
    result = subprocess.run(
        [need("nebula"), "-test", "-config", "config.yml"],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
    )  # fmt: skip
    for made in ("host.crt", "host.key"):
        (folder / made).unlink()
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_nebula_takes_both_configurations_and_their_firewall_rules(tmp_path: Path) -> None:
    subprocess.run(
        [need("nebula-cert"), "ca", "-name", "test", "-out-crt", "ca.crt", "-out-key", "ca.key"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    said = _nebula_test(tmp_path, WORK_YML, "work", "10.42.0.11/24", "work,staff")
    assert said.count("Firewall rule added") == 4
    assert (
        "direction:outgoing endPort:8010 groups:[] host: ip:10.42.0.1/32 proto:6 startPort:8000"
        in said
    )
    said = _nebula_test(tmp_path, OFFICE_YML, "office", "10.42.0.1/24", "servers")
    assert said.count("Firewall rule added") == 7
    assert "direction:incoming endPort:445 groups:[finance] host: ip: proto:6 startPort:445" in said
    # The control: a configuration nebula refuses fails this check.
    broken = OFFICE_YML.replace("proto: icmp", "proto: carrier-pigeon")
    with pytest.raises(AssertionError):
        _nebula_test(tmp_path, broken, "office", "10.42.0.1/24", "servers")
