"""`qnix selftest` on the office example: the clean host reports no violation (the control);
with one `qnix.Net` opening added, that port is allowed and open. Then, one at a time, a
weakening made by hand makes it exit 1 naming exactly that violation: an nft rule opening a
port the policy denies, one dropping the port it opens, a secret bound into a compartment that
does not declare it, a compartment started without its seccomp filter. The last two start the
compartment through the library from this test process, its keeper patched here; the shipped
command line has no switch for any of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.nix import hardening
from qnix.runtime import lifecycle, secrets
from qnix.runtime.live import KeeperConfig, live_workstation
from qnix.runtime.selftest import CLOSED_PORT, sysctl_checks
from tests.runtime.test_boot import OFFICE, Office

# The compartments the office example runs once applied, with the vault started.
RUNNING = ["sys-firewall", "sys-net", "vault", "work"]
CHECKS = [
    "capabilities CapPrm",
    "capabilities CapEff",
    "capabilities CapBnd",
    "capabilities CapAmb",
    "no_new_privs",
    "seccomp",
    "user",
    "pid namespace",
    "/usr",
    "secrets",
]
# The keeper of qnix.broker.keeper_main, with bubblewrap told to load no seccomp filter.
UNFILTERED_KEEPER = """
import functools, sys
from qnix.runtime.backends import namespace
namespace.prepare = functools.partial(namespace.prepare, with_seccomp=False)
from qnix.broker import keeper_main
sys.exit(keeper_main.main(["keeper_main", *sys.argv[1:]]))
"""


@pytest.fixture
def office() -> Iterator[Office]:
    made = Office()
    try:
        made.ok("apply", str(OFFICE))
        made.ok("start", "vault")
        yield made
    finally:
        made.close()


def selftest(host: Office) -> tuple[int, dict[str, Any]]:
    result = host.qnix("selftest", "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def probes_left() -> list[str]:
    """Processes running the probe program (its text is in their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"SECRETS_DIR" in argv and entry.isdigit():
            found.append(entry)
    return found


def addresses(host: Office) -> dict[str, str]:
    return {name: str(row["address"]) for name, row in host.ls().items() if row["address"]}


def start_by_hand(
    host: Office,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    *,
    keeper_code: str | None = None,
    extra_secrets_of: str | None = None,
) -> None:
    """Start `name` through the library, as `qnix start` does, with its keeper run by
    `keeper_code` and/or given the secrets of `extra_secrets_of` as well."""
    monkeypatch.setenv("QNIX_AGE_IDENTITY", str(host.age_identity))
    made_config = lifecycle.keeper_config

    def config_with_more_secrets(*args: Any, **kwargs: Any) -> KeeperConfig:
        config = made_config(*args, **kwargs)
        if extra_secrets_of is None:
            return config
        ws = args[1]
        extra = secrets.deliveries(ws, ws.compartments[extra_secrets_of], host.paths.generation_dir)
        return dataclasses.replace(
            config,
            secrets=config.secrets + extra,
            age_identity=str(host.age_identity),
        )

    def spawn(paths: Any, config: KeeperConfig) -> None:
        if keeper_code is None:
            return made_spawn(paths, config)
        paths.keeper_config(config.name).write_bytes(config.to_json())
        paths.keeper_config(config.name).chmod(0o600)
        with paths.keeper_log(config.name).open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", keeper_code, str(paths.keeper_config(config.name))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == b"ready"
        process.stdout.close()
        return None

    made_spawn = lifecycle.spawn_keeper
    monkeypatch.setattr(lifecycle, "keeper_config", config_with_more_secrets)
    monkeypatch.setattr(lifecycle, "spawn_keeper", spawn)
    assert lifecycle.start(host.paths, name)


# ---- the control: the office as applied --------------------------------------------------------


def test_the_office_as_applied_has_no_violation(office: Office) -> None:
    code, report = selftest(office)
    assert (code, report["violations"]) == (0, [])
    # Every running compartment was probed from inside, each check as the spec says.
    checked = sorted({c["compartment"] for c in report["checks"]})
    assert checked == RUNNING
    by_check = {(c["compartment"], c["check"]): c["actual"] for c in report["checks"]}
    assert [check for name, check in by_check if name == "work"] == CHECKS
    assert [check for name, check in by_check if name == "vault"] == [*CHECKS, "interfaces"]
    assert by_check["work", "seccomp"] == "2 (filter)"
    assert by_check["work", "no_new_privs"] == "1"
    assert by_check["work", "secrets"] == "work-vpn"
    assert by_check["vault", "secrets"] == "vault-master"
    assert by_check["sys-net", "secrets"] == "none"
    assert by_check["vault", "interfaces"] == "lo"
    # Every ordered pair of networked compartments, on the closed port: the policy opens none.
    networked = ["sys-firewall", "sys-net", "work"]
    assert [(c["source"], c["target"], c["proto"], c["port"]) for c in report["connections"]] == [
        (source, target, "tcp", CLOSED_PORT)
        for source in networked
        for target in networked
        if source != target
    ]
    assert {(c["allowed"], c["open"]) for c in report["connections"]} == {(False, False)}
    assert report["sysctls_enforced"] is False  # the test host is not NixOS
    assert not probes_left()
    # The human form: the matrix, and the verdict; the audit log holds the summary.
    shown = office.qnix("selftest")
    assert shown.returncode == 0, shown.stderr
    row = "│ work         │ sys-net      │ tcp/47813 │ deny   │ denied and closed │"
    assert row in shown.stdout
    assert shown.stdout.endswith("selftest: no violation\n")
    logged = [json.loads(line) for line in office.paths.audit_log.read_text().splitlines()]
    last = [entry for entry in logged if entry["event"] == "selftest"][-1]
    assert last["compartments"] == RUNNING
    assert (last["connections"], last["violations"]) == (6, [])
    assert office.qnix("audit", "verify").returncode == 0


# ---- one weakening at a time -------------------------------------------------------------------


def test_an_nft_rule_opening_a_denied_port_is_a_violation(office: Office) -> None:
    address = addresses(office)
    rule = (
        f"ip saddr {address['work']} ip daddr {address['sys-firewall']} "
        f"tcp dport {CLOSED_PORT} accept"
    )
    office.nft("insert", "rule", "inet", "qnix", "admitted", *rule.split())
    code, report = selftest(office)
    assert (code, report["violations"]) == (
        1,
        [f"work -> sys-firewall tcp/{CLOSED_PORT}: open, the policy says denied"],
    )
    assert not probes_left()
    shown = office.qnix("selftest")
    assert shown.returncode == 1
    assert "│ work         │ sys-firewall │ tcp/47813 │ deny   │ VIOLATION: open   │" in (
        shown.stdout
    )


def test_a_secret_bound_into_a_second_compartment_is_a_violation(
    office: Office, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_by_hand(office, monkeypatch, "personal", extra_secrets_of="work")
    code, report = selftest(office)
    assert (code, report["violations"]) == (1, ["personal: secrets is work-vpn, not none"])


def test_a_compartment_without_its_seccomp_filter_is_a_violation(
    office: Office, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_by_hand(office, monkeypatch, "personal", keeper_code=UNFILTERED_KEEPER)
    code, report = selftest(office)
    assert (code, report["violations"]) == (1, ["personal: seccomp is 0, not 2 (filter)"])


# ---- the host's kernel parameters --------------------------------------------------------------


def test_on_nixos_a_sysctl_unlike_the_profile_is_a_violation(office: Office) -> None:
    """On NixOS qnix set the profile's sysctls, so a difference is a violation; elsewhere the
    same difference is the host's own, a warning. Set in the stand-in host's namespace."""
    key, wanted = "net.ipv4.conf.default.log_martians", "1"
    ws = live_workstation(office.paths)
    assert ws is not None and hardening.sysctls(ws)[key] == int(wanted)

    def set_to(value: str) -> None:
        subprocess.run(
            [office.ip, "netns", "exec", office.host_netns, "sysctl", "-q", f"{key}={value}"],
            check=True,
        )

    set_to("0")
    on_nixos = {s.key: s for s in sysctl_checks(office.paths, ws, enforced=True)}
    elsewhere = {s.key: s for s in sysctl_checks(office.paths, ws, enforced=False)}
    assert (on_nixos[key].actual, on_nixos[key].violated) == ("0", True)
    assert (elsewhere[key].violated, elsewhere[key].to_json()["warning"]) == (False, True)
    set_to(wanted)  # the control: as the profile says, no violation
    on_nixos = {s.key: s for s in sysctl_checks(office.paths, ws, enforced=True)}
    assert (on_nixos[key].actual, on_nixos[key].violated) == (wanted, False)


# ---- an opening of the policy ------------------------------------------------------------------

OPENING = "qnix.Net +tcp+8443 work sys-firewall allow"


@pytest.fixture
def office_with_an_opening() -> Iterator[Office]:
    """The office example with one `qnix.Net` line: work may open tcp/8443 of sys-firewall."""
    made = Office()
    try:
        copied = made.base / "examples"
        shutil.copytree(OFFICE.parent, copied)
        spec = copied / OFFICE.name
        text = spec.read_text()
        assert text.count("rules = [\n") == 1
        spec.write_text(text.replace("rules = [\n", f'rules = [\n  "{OPENING}",\n'))
        made.ok("apply", str(spec))
        yield made
    finally:
        made.close()


def test_an_opening_is_allowed_and_open_and_a_rule_closing_it_a_violation(
    office_with_an_opening: Office,
) -> None:
    office = office_with_an_opening
    code, report = selftest(office)
    assert (code, report["violations"]) == (0, [])
    opened = [c for c in report["connections"] if c["allowed"]]
    assert opened == [
        {
            "source": "work",
            "target": "sys-firewall",
            "proto": "tcp",
            "port": 8443,
            "allowed": True,
            "open": True,
            "rule": "00-spec.policy:2",  # the generation's copy of the spec's rules
            "violation": False,
        }
    ]
    # The weakening the other way: a rule dropping what the policy opens.
    address = addresses(office)
    rule = f"ip saddr {address['work']} ip daddr {address['sys-firewall']} tcp dport 8443 drop"
    office.nft("insert", "rule", "inet", "qnix", "admitted", *rule.split())
    code, report = selftest(office)
    assert (code, report["violations"]) == (
        1,
        ["work -> sys-firewall tcp/8443: closed, the policy says allowed"],
    )
    assert not probes_left()
