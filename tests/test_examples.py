"""Every example builds, and its ruleset and modules pass the real tools."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from qnix.compile.artifacts import compile_spec
from qnix.compile.graph import policy_rules_of
from qnix.compile.inputs import load
from qnix.compile.policy import render_rule
from tests.conftest import EXAMPLES, need

SPECS = sorted(EXAMPLES.glob("*.toml"))


def test_the_three_examples_exist() -> None:
    assert {p.name for p in SPECS} >= {"smb-office.toml", "developer.toml", "executive-arm.toml"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_example_builds_and_passes_nft_and_nix(spec: Path, tmp_path: Path) -> None:
    files = compile_spec(load(spec)).files
    for relative, data in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    subprocess.run([need("nft"), "-c", "-f", str(tmp_path / "nftables/qnix.nft")], check=True)
    nix_files = [str(tmp_path / p) for p in files if p.endswith(".nix")]
    subprocess.run(
        [need("nix-instantiate"), "--parse", *nix_files], check=True, capture_output=True
    )


def test_executive_example_is_aarch64_and_paranoid() -> None:
    ws = load(EXAMPLES / "executive-arm.toml").workstation
    assert (ws.host.system, ws.host.hardening) == ("aarch64-linux", "paranoid")
    banking = ws.compartments["banking"]
    assert [rule.host for rule in banking.firewall if not rule.dns] == ["online.bank.example"]


def _rule_lines(spec: str) -> list[str]:
    return [render_rule(rule) for rule in policy_rules_of(load(EXAMPLES / spec))]


def test_developer_example_keeps_keys_offline_and_untrusted_code_in_a_vm() -> None:
    ws = load(EXAMPLES / "developer.toml").workstation
    assert (ws.host.system, ws.host.hardening, ws.host.disk.filesystem) == (
        "x86_64-linux",
        "strict",
        "bcachefs",
    )
    c = ws.compartments
    assert (c["dev"].isolation, c["build"].isolation, c["sandbox"].isolation) == (
        "container",
        "namespace",
        "vm",
    )
    assert (c["build"].persistence, c["sandbox"].persistence) == ("disposable", "disposable")
    assert (c["vault"].network, c["sandbox"].network) == ("none", "none")
    assert set(c["vault"].secrets) == {"dev-ssh-key", "dev-gpg-key"}
    dev_ports = {(r.host, r.ports) for r in c["dev"].firewall if r.host}
    assert ("code.example.com", ("22", "443")) in dev_ports
    registries = {r.host for r in c["build"].firewall if not r.dns}
    assert registries <= {host for host, _ in dev_ports}  # build reaches registries only
    assert "code.example.com" not in registries
    assert ws.disposable_templates and c["sys-net"].provides_network
    lines = _rule_lines("developer.toml")
    assert lines[:2] == [
        "qnix.SshAgent * dev vault ask default_target=vault",
        "qnix.Gpg * dev vault ask default_target=vault",
    ]
    assert "qnix.Filecopy * build dev allow" in lines


def test_executive_example_goes_online_through_its_vpn_compartment() -> None:
    ws = load(EXAMPLES / "executive-arm.toml").workstation
    host = ws.host
    assert (host.secure_boot, host.desktop.hyprland, host.desktop.lid_switch) == (
        True,
        True,
        "lock",
    )
    assert host.disk.filesystem in ("ext4", "btrfs")
    c = ws.compartments
    assert c["sys-vpn"].provides_network and c["sys-vpn"].network == "sys-net"
    for name in ("mail", "docs", "banking", "untrusted"):
        assert c[name].network == "sys-vpn", name
    assert c["vault"].network == "none"
    assert c["untrusted"].persistence == "disposable"
    assert ws.audit.remote_syslog is not None and ws.audit.remote_syslog.tls


# Names and networks the RFCs keep for documentation (RFC 2606, RFC 6761, RFC 5737).
RESERVED_DOMAINS = ("example.com", "example.net", "example.org", "example")
DOCUMENTATION_NETS = [
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
]


def _documentation_address(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return isinstance(network, ipaddress.IPv4Network) and any(
        network.subnet_of(n) for n in DOCUMENTATION_NETS
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_examples_only_name_reserved_example_hosts_and_addresses(spec: Path) -> None:
    ws = load(spec).workstation
    rules = [
        rule
        for unit in [*ws.compartments.values(), *ws.disposable_templates.values()]
        for rule in unit.firewall
    ]
    hosts = [rule.host for rule in rules if rule.host]
    if ws.audit.remote_syslog is not None:
        hosts += ws.audit.remote_syslog.hosts
    assert hosts
    for host in hosts:
        assert host in RESERVED_DOMAINS or host.endswith(tuple(f".{d}" for d in RESERVED_DOMAINS))
    for cidr in [rule.cidr for rule in rules if rule.cidr]:
        assert cidr == "0.0.0.0/0" or _documentation_address(ipaddress.ip_network(cidr)), cidr
    for address in ws.host.dns_servers:
        assert _documentation_address(ipaddress.ip_network(address)), address
