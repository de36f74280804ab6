"""qnix SIGKILLed at random points of apply, start and dispose, and inside its in-process
network steps (netlink requests, nft transactions, namespace and sysctl changes): `qnix gc` and
`qnix apply` always bring the host back to exactly the spec, and nothing leaks."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
[host]
hostname = "faults"
subnet = "10.203.0.0/16"

[compartments.sys-net]
network = "uplink"
provides_network = true
autostart = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[compartments.work]
network = "sys-net"
autostart = true
memory_mb = 128
firewall = [{ proto = "tcp", cidr = "203.0.113.0/24", ports = [443] }]

[compartments.vault]
memory_mb = 128

[disposable_templates.dvm]
network = "sys-net"
memory_mb = 128
"""
KILLS = 30
STEP_KILLS = 15
# A change made in-process, as `qnix --debug` announces it just before making it (listings,
# "list ..." and "show ...", are not changes).
NETWORK_CHANGE = re.compile(r"^qnix\.net: (?:netlink|netns|nft|sysctl): \S+: (?!list |show )")


@pytest.fixture
def host() -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        yield live
    finally:
        live.close()


def snapshot(host: LiveHost) -> dict[str, object]:
    """Everything of qnix's on the (stand-in) host, as listings."""
    states = {name: entry["state"] for name, entry in host.ls().items()}
    return {
        "compartments": states,
        "netns": sorted(host.compartment_netns()),
        "links": host.net.list_links(),
        "rules": host.net.list_rule_interfaces(),
        "table": host.net.table_listing(),
        "cgroups": sorted(host.cgroup_names()),
        "run_dirs": sorted(p.name for p in (host.paths.run_root / "compartments").iterdir()),
    }


def interrupted(host: LiveHost, argv: list[str], delay: float) -> None:
    """Start `qnix ARGV`, SIGKILL it after `delay` seconds (or let it finish first)."""
    proc = subprocess.Popen(
        [QNIX, *argv], env=host.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=30)


def interrupted_at_step(host: LiveHost, argv: list[str], step: int) -> bool:
    """Start `qnix --debug ARGV` and SIGKILL it as it announces its `step`-th in-process
    network change: the kill lands while that netlink request or nft transaction runs, or
    within the next few. False if it finished with fewer changes."""
    proc = subprocess.Popen(
        [QNIX, "--debug", *argv],
        env=host.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if NETWORK_CHANGE.match(line):
            seen += 1
            if seen == step:
                proc.kill()
                break
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    return seen >= step


def test_sigkill_at_random_points_then_gc_and_apply_restore_the_spec(host: LiveHost) -> None:
    spec = str(host.spec(SPEC))
    host.ok("apply", spec)
    expected = snapshot(host)
    assert expected["compartments"] == {"sys-net": "running", "vault": "stopped", "work": "running"}
    rng = random.Random(20261129)  # fixed: a failure can be replayed
    operations = [
        ["apply", spec],
        ["start", "vault"],
        ["dispose", "--template", "dvm", "--", "sleep", "5"],
    ]
    for kill in range(KILLS):
        argv = operations[kill % len(operations)]
        if argv[0] == "apply":
            host.ok("down")  # so that the killed apply has everything to do
        interrupted(host, argv, rng.uniform(0.0, 0.8))
        host.ok("gc")
        host.ok("apply", spec)
        host.qnix("stop", "vault")  # started on purpose above; the spec does not autostart it
        assert snapshot(host) == expected, f"after SIGKILL {kill} of qnix {argv[0]}"


def test_sigkill_inside_network_steps_then_gc_and_apply_restore_the_spec(host: LiveHost) -> None:
    spec = str(host.spec(SPEC))
    host.ok("apply", spec)
    expected = snapshot(host)
    rng = random.Random(20270105)  # fixed: a failure can be replayed
    operations = [
        (["apply", spec], 28),  # from nothing: every namespace, link, rule, table, sysctl
        (["dispose", "--template", "dvm", "--", "sleep", "5"], 12),  # its setup
    ]
    landed = 0
    for kill in range(STEP_KILLS):
        argv, changes = operations[kill % len(operations)]
        if argv[0] == "apply":
            host.ok("down")
        step = rng.randint(1, changes)
        landed += interrupted_at_step(host, argv, step)
        host.ok("gc")
        host.ok("apply", spec)
        assert snapshot(host) == expected, f"after SIGKILL {kill} of qnix {argv[0]} at step {step}"
    assert landed >= STEP_KILLS // 2  # most kills hit a step, not a finished command
