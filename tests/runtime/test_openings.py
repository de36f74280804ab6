"""Openings from the policy, live: compartments on a stand-in host, a server inside one of them
listening on two ports, and the policy opening one. The control is the same spec without the
policy line: then neither port answers, so it is the opening that lets the connection through.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from qnix.compile import names
from tests.netprobes import PROBE, SERVE
from tests.runtime.livehost import QNIX, LiveHost

SUBNET = "10.206.0.0/16"
OPEN, CLOSED = 8080, 8081
LINKS = names.allocate_links(["client", "routed", "gate", "server"], SUBNET)

# client leaves through the host, routed through the net compartment gate; both are tagged
# so that one line names them.
CONTROL = f"""\
[host]
hostname = "lab"
subnet = "{SUBNET}"

[compartments.client]
network = "uplink"
tags = ["clients"]
memory_mb = 256

[compartments.gate]
network = "uplink"
provides_network = true
memory_mb = 128

[compartments.routed]
network = "gate"
tags = ["clients"]
memory_mb = 256

[compartments.server]
network = "uplink"
memory_mb = 256
"""
OPENED = (
    CONTROL
    + f"""
[policy]
rules = ["qnix.Net +tcp+{OPEN} @tag:clients server allow"]
"""
)


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    listener = None
    try:
        made.ok("apply", str(made.spec(CONTROL)))
        listener = subprocess.Popen(
            [QNIX, "run", "server", "--", "python3", "-c", SERVE, str(OPEN), str(CLOSED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=made.env,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline() == "ready\n"
        yield made
    finally:
        if listener is not None:
            if listener.stdin is not None:
                listener.stdin.close()
            listener.kill()
            listener.wait(timeout=10)
        made.close()


def probe(host: LiveHost, compartment: str) -> list[str]:
    server = LINKS["server"].address
    targets = [[server, OPEN], [server, CLOSED]]
    result = host.qnix("run", compartment, "--", "python3", "-c", PROBE, json.dumps(targets))
    assert result.returncode == 0, result.stderr
    answers: list[str] = json.loads(result.stdout)
    return answers


def openings(host: LiveHost) -> str:
    return host.nft("list", "set", "inet", "qnix", "openings")


def test_the_policy_opens_one_port_and_only_it(host: LiveHost) -> None:
    client, routed = LINKS["client"].address, LINKS["routed"].address
    # Control: without the policy line, nothing between compartments answers.
    assert probe(host, "client") == ["timeout", "timeout"]
    assert probe(host, "routed") == ["timeout", "timeout"]
    assert "elements" not in openings(host)

    host.ok("apply", str(host.spec(OPENED)))
    server = LINKS["server"].address
    listed = openings(host)
    for source in (client, routed):
        assert f"{source} . {server} . tcp . {OPEN}" in listed
    assert listed.count(" . tcp . ") == 2
    # The server sees each client's own address: no masquerade between compartments.
    assert probe(host, "client") == [f"ok {client}", "timeout"]
    assert probe(host, "routed") == [f"ok {routed}", "timeout"]
    # Nothing opens the other way: dropped, not even refused.
    result = host.qnix("run", "server", "--", "python3", "-c", PROBE, json.dumps([[client, OPEN]]))
    assert json.loads(result.stdout) == ["timeout"]

    # Taking the line out closes it again.
    host.ok("apply", str(host.spec(CONTROL)))
    assert probe(host, "client") == ["timeout", "timeout"]
    assert "elements" not in openings(host)
