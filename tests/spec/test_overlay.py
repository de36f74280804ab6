"""The spec's `[overlay]` and each compartment's `overlay`: the example loads (the control), and
each mistake gives one problem at its key path, with the value and a hint."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from qnix.compile.inputs import load
from qnix.errors import Problem, SpecError
from tests.conftest import DATA

SPEC = DATA / "specs" / "overlay.toml"
TEXT = SPEC.read_text()
WORK_FIREWALL = 'firewall = [{ proto = "udp", cidr = "203.0.113.1/32", ports = [4242] }]'


@dataclass(frozen=True)
class Bad:
    id: str
    old: str
    new: str
    path: str
    message: str
    value: str = ""
    hint: str = ""
    count: int = 1  # problems: the first (in key order) is the one described


CASES = [
    Bad(
        "no-overlay-section",
        '[overlay]\nsubnet = "10.42.0.0/24"\n\n[overlay.servers.office]\naddress = "10.42.0.1"\n'
        'host = "203.0.113.1"\nlighthouse = true\nadmit = [\n'
        '  { groups = ["work", "finance"], proto = "tcp", ports = [445, "8000-8010"] },\n'
        '  { groups = ["staff"], proto = "tcp", ports = [443] },\n'
        '  { groups = ["staff"], proto = "icmp" },\n]\n',
        "",
        "compartments.personal.overlay",
        "there is no [overlay] to join",
        hint="add [overlay]",
        count=2,  # and work's
    ),
    Bad(
        "address-outside-the-subnet",
        '"10.42.0.12"',
        '"10.43.0.12"',
        "compartments.personal.overlay.address",
        "is not a host address of the overlay's subnet 10.42.0.0/24",
        '"10.43.0.12"',
    ),
    Bad(
        "address-of-the-server",
        '"10.42.0.12"',
        '"10.42.0.1"',
        "compartments.personal.overlay.address",
        "is already the address of overlay.servers.office",
        '"10.42.0.1"',
        "an address of its own",
    ),
    Bad(
        "firewall-keeps-the-lighthouse-out",
        WORK_FIREWALL,
        'firewall = [{ proto = "udp", cidr = "203.0.113.1/32", ports = [4243] }]',
        "compartments.work.firewall",
        "does not let the overlay reach lighthouse 203.0.113.1:4242",
        hint='add { proto = "udp", cidr = "203.0.113.1/32", ports = [4242] } to its firewall',
    ),
    Bad(
        "no-lighthouse",
        "lighthouse = true\n",
        "",
        "overlay.servers",
        "no server is a lighthouse",
        hint="set lighthouse = true",
    ),
    Bad(
        "lighthouse-without-host",
        'host = "203.0.113.1"\n',
        "",
        "overlay.servers.office.host",
        "a lighthouse needs the host it is reached at",
    ),
    Bad(
        "ca-cert-without-key",
        'subnet = "10.42.0.0/24"\n',
        'subnet = "10.42.0.0/24"\nca_cert = "/etc/qnix/overlay/ca.crt"\n',
        "overlay.ca_cert",
        "give ca_cert and ca_key together, or neither",
        '"/etc/qnix/overlay/ca.crt"',
        hint="neither: qnix makes",
    ),
    Bad(
        "icmp-with-ports",
        '{ groups = ["staff"], proto = "icmp" }',
        '{ groups = ["staff"], proto = "icmp", ports = [1] }',
        "overlay.servers.office.admit[2].ports",
        "icmp has no ports",
        "[1]",
    ),
    Bad(
        "tailscale-outside-a-container",
        'isolation = "container"\n',
        "",
        "compartments.work.overlay.tailscale_auth_key",
        "only a container compartment runs Tailscale on NixOS",
        '"tailscale-work"',
        'use isolation = "container"',
    ),
    Bad(
        "tailscale-key-not-listed",
        'secrets = ["tailscale-work"]\n',
        "",
        "compartments.work.overlay.tailscale_auth_key",
        "names a secret the compartment does not list",
        '"tailscale-work"',
        'add "tailscale-work" to compartments.work.secrets',
    ),
    Bad(
        "vm",
        "[compartments.personal]\n",
        '[compartments.personal]\nisolation = "vm"\n',
        "compartments.personal.overlay",
        "a VM compartment cannot join the overlay yet",
        '"vm"',
        'use isolation = "namespace" or "container"',
    ),
]


def _problems(text: str, folder: Path) -> list[Problem]:
    spec = folder / "spec.toml"
    spec.write_text(text)
    shutil.copytree(SPEC.parent / "secrets", folder / "secrets")
    with pytest.raises(SpecError) as caught:
        load(spec)
    return caught.value.problems


def test_the_example_loads() -> None:
    ws = load(SPEC).workstation
    assert ws.overlay is not None and ws.compartments["work"].overlay is not None
    assert ws.compartments["work"].overlay.groups == ("work", "staff")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_mistake_gives_one_located_problem(case: Bad, tmp_path: Path) -> None:
    assert TEXT.count(case.old) == 1, case.old
    problems = _problems(TEXT.replace(case.old, case.new), tmp_path)
    assert len(problems) == case.count, "\n".join(p.render() for p in problems)
    problem = problems[0]
    assert problem.path == case.path
    assert problem.message == case.message
    assert problem.value == case.value
    assert case.hint in problem.hint
