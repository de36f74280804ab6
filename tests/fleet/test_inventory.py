"""`qnix fleet check`: the example fleet passes; each mistake of a role, a host or an override
is reported once, at the key path of the fleet file that wrote it, with value and hint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qnix.errors import Problem, SpecError
from qnix.fleet.inventory import check_fleet, host_document, host_spec, read_fleet
from tests.conftest import EXAMPLES

FLEET = EXAMPLES / "fleet"
QNIX = str(Path(sys.executable).with_name("qnix"))
DESK_05_KEY = "age1uzmxg9fa9hys4afhhermc26uadsdvtcjphv6swhqfmarpuac54cqka9tp6"
DESK_01_KEY = "age1a0d6lr0mm043l6nfeydzf4ajxer6fyqzg78gj47pr2xvn5hq6gvsr32ay3"


def copy_of_example(tmp_path: Path, edit: tuple[str, str] | None = None, tail: str = "") -> Path:
    folder = tmp_path / "fleet"
    shutil.copytree(FLEET, folder)
    path = folder / "fleet.toml"
    text = path.read_text()
    if edit is not None:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    path.write_text(text + tail)
    return path


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(SpecError) as caught:
        check_fleet(read_fleet(path))
    return caught.value.problems


def test_the_example_fleet_has_three_roles_and_five_hosts_two_not_nixos() -> None:
    fleet = read_fleet(FLEET / "fleet.toml")
    hosts = check_fleet(fleet)
    assert sorted(fleet.file.roles) == ["developer", "finance", "office"]
    assert sorted(hosts) == ["desk-01", "desk-02", "desk-03", "desk-04", "desk-05"]
    assert [n for n, h in sorted(fleet.file.hosts.items()) if not h.nixos] == ["desk-04", "desk-05"]


def test_a_host_spec_is_its_roles_in_order_then_its_overrides() -> None:
    fleet = read_fleet(FLEET / "fleet.toml")
    desk_05 = host_spec(fleet, "desk-05").workstation
    assert desk_05.host.hostname == "desk-05"
    assert desk_05.host.hardening == "paranoid"  # the override beats the role's "strict"
    assert sorted(desk_05.compartments) == ["banking", "personal", "work"]
    assert desk_05.policy.dir == "policy.d"
    desk_02 = host_spec(fleet, "desk-02").workstation
    assert desk_02.compartments["dev"].memory_mb == 1024
    assert host_spec(fleet, "desk-04").workstation.compartments["dev"].memory_mb == 512
    document = host_document(fleet, "desk-02")
    assert document.origins["compartments.dev.memory_mb"] == (
        "hosts.desk-02.overrides.compartments.dev.memory_mb"
    )
    assert document.origins["compartments.dev.label"] == "roles.developer.compartments.dev.label"


def test_an_override_that_breaks_a_host_is_reported_at_the_override(tmp_path: Path) -> None:
    path = copy_of_example(
        tmp_path,
        (
            "overrides.compartments.dev.memory_mb = 1024",
            'overrides.compartments.dev.memory_mb = "1024"',
        ),
    )
    assert problems_of(path) == [
        Problem(
            str(path),
            "hosts.desk-02.overrides.compartments.dev.memory_mb",
            "must be a whole number",
            '"1024"',
            "write the number without quotes: 1024",
        )
    ]


def test_a_role_that_breaks_its_hosts_is_reported_once_at_the_role(tmp_path: Path) -> None:
    path = copy_of_example(tmp_path, ("* banking work deny", "* bankin work deny"))
    assert problems_of(path) == [
        Problem(
            str(path),
            "roles.finance.policy.rules[0]",
            "source 'bankin' names no compartment",
            '"qnix.Filecopy * bankin work deny"',
            "did you mean 'banking'?",
        )
    ]


def test_an_unknown_key_in_a_role_names_the_known_ones(tmp_path: Path) -> None:
    path = copy_of_example(tmp_path, ('label = "purple"', 'colour = "purple"'))
    [problem] = problems_of(path)
    assert (problem.path, problem.message) == (
        "roles.developer.compartments.dev.colour",
        "unknown key",
    )
    assert problem.hint.startswith("known keys here: apps, autostart, cpus")


def test_an_unknown_role_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = copy_of_example(tmp_path, tail='\n[hosts.desk-06]\nroles = ["office", "financ"]\n')
    assert problems_of(path) == [
        Problem(
            str(path),
            "hosts.desk-06.roles[1]",
            "names no role",
            '"financ"',
            "did you mean 'finance'?",
        )
    ]


def test_a_host_using_a_secret_must_be_a_recipient_and_no_other_host(tmp_path: Path) -> None:
    missing = copy_of_example(tmp_path / "a", (f'  "{DESK_05_KEY}",  # desk-05\n', ""))
    assert [(p.path, p.message) for p in problems_of(missing)] == [
        (
            "roles.finance.secrets.bank-otp.recipients",
            "host desk-05 uses this secret but its age key is not a recipient",
        )
    ]
    # desk-01 is no finance desk: its key among the recipients lets it decrypt what it has
    # no need of.
    extra = copy_of_example(tmp_path / "b", ("  # desk-05\n", f'  # desk-05\n  "{DESK_01_KEY}",\n'))
    assert problems_of(extra) == [
        Problem(
            str(extra),
            "roles.finance.secrets.bank-otp.recipients",
            "host desk-01 can decrypt this secret but uses it nowhere",
            f'"{DESK_01_KEY}"',
            "remove the host's key from the recipients and re-encrypt the secret",
        )
    ]


def test_the_allowed_signers_file_must_be_there(tmp_path: Path) -> None:
    path = copy_of_example(tmp_path)
    (path.parent / "allowed_signers").unlink()
    assert [(p.path, p.message) for p in problems_of(path)] == [
        ("", "allowed_signers beside it: file not found")
    ]


def test_the_command_prints_every_host_and_exits_2_on_a_problem(tmp_path: Path) -> None:
    good = subprocess.run([QNIX, "fleet", "check", str(FLEET)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1] == f"{FLEET / 'fleet.toml'}: ok — fleet acme, 5 hosts"
    assert "desk-05: ok — x86_64-linux, not NixOS, roles office, finance, 3 compartments" in (
        good.stdout
    )
    path = copy_of_example(tmp_path, ('hardening = "paranoid"', 'hardening = "paranoia"'))
    bad = subprocess.run([QNIX, "fleet", "check", str(path.parent)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert f"{path}: hosts.desk-05.overrides.host.hardening: must be one of" in bad.stderr


def test_a_role_or_override_cannot_rename_a_host(tmp_path: Path) -> None:
    path = copy_of_example(
        tmp_path, ('overrides.host.hardening = "paranoid"', 'overrides.host.hostname = "ceo"')
    )
    assert problems_of(path) == [
        Problem(
            str(path),
            "hosts.desk-05.overrides.host.hostname",
            "a host's name is its key under [hosts]; roles and overrides cannot set it",
            '"ceo"',
            "remove this key",
        )
    ]
