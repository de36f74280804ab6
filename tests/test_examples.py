"""Every example builds, and its ruleset and modules pass the real tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qnix.compile.artifacts import compile_spec
from qnix.spec.load import load
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
