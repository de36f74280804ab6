"""Valid specs: safe defaults, frozen models, one model whatever the file format."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from qnix.compile.inputs import load
from qnix.spec.model import Compartment, FirewallRule, Workstation
from tests.conftest import DATA, EXAMPLES, need

SPECS = DATA / "specs"


def test_a_minimal_spec_gets_the_safe_defaults(tmp_path: Path) -> None:
    spec = tmp_path / "minimal.toml"
    spec.write_text('[host]\nhostname = "x"\n[compartments.a]\n')
    workstation = load(spec).workstation
    host = workstation.host
    assert (host.hardening, host.disk.encryption, host.disk.tpm2) == ("strict", "luks2", True)
    assert host.secure_boot is False
    (compartment,) = workstation.compartments.values()
    assert compartment.name == "a"
    assert compartment.network == "none"
    assert compartment.firewall == ()
    assert compartment.persistence == "persistent"
    assert compartment.provides_network is False
    assert compartment.devices == ()
    assert compartment.secrets == ()
    assert workstation.policy.rules == ()
    assert workstation.secrets == {}


def test_models_are_frozen() -> None:
    workstation = Workstation.model_validate(
        {
            "host": {"hostname": "x"},
            "compartments": {
                "a": {"network": "uplink", "firewall": [{"proto": "tcp", "host": "example.com"}]}
            },
        }
    )
    compartment = workstation.compartments["a"]
    rule = compartment.firewall[0]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        workstation.host = workstation.host  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        workstation.host.disk.tpm2 = False  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        compartment.network = "none"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        rule.host = "evil.example"  # type: ignore[misc]
    assert isinstance(compartment.firewall, tuple)
    assert isinstance(compartment, Compartment)
    assert isinstance(rule, FirewallRule)


def test_the_office_example_loads() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    workstation = loaded.workstation
    assert list(workstation.compartments) == [
        "banking",
        "comms",
        "personal",
        "sys-firewall",
        "sys-net",
        "untrusted",
        "vault",
        "work",
    ]
    assert [c.name for c in workstation.net_compartments()] == ["sys-firewall", "sys-net"]
    assert workstation.compartments["work"].network == "sys-firewall"
    assert workstation.compartments["sys-firewall"].network == "sys-net"
    assert workstation.compartments["comms"].firewall[2].ports == ("3478-3481", "50000-60000")
    assert workstation.default_disposable == "default-dvm"
    assert [name for name, _ in loaded.policy_files] == ["30-office.policy"]
    assert workstation.tags() == {"work", "trusted"}


def test_toml_json_and_nix_give_the_same_workstation() -> None:
    need("nix-instantiate")
    loaded = [load(SPECS / f"small{suffix}") for suffix in (".toml", ".json", ".nix")]
    toml_spec, json_spec, nix_spec = (spec.workstation for spec in loaded)
    assert toml_spec == json_spec == nix_spec
    dumps = {spec.workstation.model_dump_json() for spec in loaded}
    assert len(dumps) == 1
    assert {spec.policy_files for spec in loaded} == {loaded[0].policy_files}
    # The content itself, so that three equally wrong readings cannot pass.
    work = nix_spec.compartments["work"]
    assert work.firewall[1].host == "mail.example.com"
    assert work.firewall[1].ports == ("443", "993", "8000-8080")
    assert work.packages == ("firefox", "python3Packages.requests")
    assert nix_spec.host.disk.device == "/dev/vda"
    assert nix_spec.host.system == "aarch64-linux"
    assert list(nix_spec.compartments) == ["sys-net", "work"]
    assert nix_spec.policy.rules == ("qnix.Filecopy * work @dispvm:dvm ask",)
    assert [name for name, _ in loaded[2].policy_files] == ["10-small.policy"]


def test_a_workstation_survives_its_own_json() -> None:
    workstation = load(EXAMPLES / "smb-office.toml").workstation
    text = workstation.model_dump_json()
    assert Workstation.model_validate_json(text) == workstation
    assert Workstation.model_validate(workstation.model_dump(mode="json")) == workstation
    assert Workstation.model_validate_json(text).model_dump_json() == text
