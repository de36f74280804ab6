"""Network escapes, tried from inside real compartments (`qnix run`) on a stand-in host.

The stand-in host is a network namespace this module makes; a second one, `upstream`, plays the
internet: a veth from the host, TCP servers on two ports that answer with the address they see.
The host itself listens on all its addresses and on its loopback. Each attempt has a control
that shows it succeeds once the named protection is taken away (a firewall rule that allows it,
an opening from the policy, the table unloaded, the compartment's own namespace left out), so a
passing test means the protection works, not that the probe is broken.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qnix.compile import names
from qnix.compile.inputs import load
from qnix.runtime import disposables
from qnix.runtime.net import route_table
from tests.isolation.conftest import Sandbox, py
from tests.netprobes import PROBE, SERVE, server, stop_servers
from tests.runtime.livehost import QNIX, LiveHost

HOST_UPLINK, UPSTREAM = "203.0.113.0", "203.0.113.1"
SUBNET = "10.204.0.0/16"
ALLOWED, DENIED, HOST_ANY, HOST_LOOPBACK, PEER_PORT = 8001, 8002, 8003, 8004, 8005

SPEC = f"""\
[host]
hostname = "lab"
subnet = "{SUBNET}"

[compartments.web]
network = "uplink"
autostart = true
memory_mb = 256
firewall = [
  {{ proto = "tcp", cidr = "{UPSTREAM}/32", ports = [{ALLOWED}] }},
  # Everything on these ports, anywhere: only the table's other defences keep the host and the
  # other compartments out of reach.
  {{ proto = "tcp", cidr = "0.0.0.0/0", ports = [{HOST_ANY}, {HOST_LOOPBACK}, {PEER_PORT}] }},
]

[compartments.peer]
network = "uplink"
autostart = true
memory_mb = 256

[compartments.offline]
autostart = true
memory_mb = 128

[compartments.gate]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{{ cidr = "0.0.0.0/0" }}]

[compartments.client]
network = "gate"
autostart = true
memory_mb = 256
firewall = [{{ proto = "tcp", cidr = "203.0.113.0/24", ports = [{ALLOWED}] }}]

[disposable_templates.dvm]
network = "gate"
memory_mb = 256
firewall = [
  {{ proto = "tcp", cidr = "{UPSTREAM}/32", ports = [{ALLOWED}] }},
  {{ proto = "tcp", cidr = "0.0.0.0/0", ports = [{PEER_PORT}] }},
]
"""
# The control: web's first rule, and the template's, also name the denied port.
WIDER = SPEC.replace(f"ports = [{ALLOWED}] }}", f"ports = [{ALLOWED}, {DENIED}] }}")


ECONNREFUSED, ENETUNREACH = 111, 101


@dataclass
class Lab:
    host: LiveHost
    upstream: str
    links: dict[str, names.Link]

    def probe(self, compartment: str, *targets: tuple[str, int]) -> list[str]:
        result = self.host.qnix(
            "run", compartment, "--", "python3", "-c", PROBE, json.dumps(targets)
        )
        assert result.returncode == 0, result.stderr
        answers: list[str] = json.loads(result.stdout)
        return answers

    def apply(self, spec: str) -> str:
        return self.host.ok("apply", str(self.host.spec(spec)))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    host = LiveHost()
    ip = host.ip
    upstream = f"{host.tag}up"
    servers: list[subprocess.Popen[str]] = []
    try:
        subprocess.run([ip, "netns", "add", upstream], check=True)
        to_upstream = ("peer", "name", "eth0", "netns", upstream)
        for command in (
            ["-n", host.host_netns, "link", "add", "up0", "type", "veth", *to_upstream],
            ["-n", host.host_netns, "addr", "add", f"{HOST_UPLINK}/31", "dev", "up0"],
            ["-n", host.host_netns, "link", "set", "up0", "up"],
            ["-n", upstream, "addr", "add", f"{UPSTREAM}/31", "dev", "eth0"],
            ["-n", upstream, "link", "set", "eth0", "up"],
            ["-n", upstream, "link", "set", "lo", "up"],
            ["-n", host.host_netns, "route", "add", "default", "via", UPSTREAM],
            # Only for the controls without the table (no masquerade): replies find their way.
            ["-n", upstream, "route", "add", SUBNET, "via", HOST_UPLINK],
        ):
            subprocess.run([ip, *command], check=True)
        in_netns = [ip, "netns", "exec"]
        host_listeners = (f"0.0.0.0:{HOST_ANY}", f"127.0.0.1:{HOST_LOOPBACK}")
        upstream_listeners = (f"0.0.0.0:{ALLOWED}", f"0.0.0.0:{DENIED}")
        servers.append(
            server([*in_netns, upstream, sys.executable, "-c", SERVE, *upstream_listeners])
        )
        servers.append(
            server([*in_netns, host.host_netns, sys.executable, "-c", SERVE, *host_listeners])
        )
        made = Lab(
            host,
            upstream,
            names.allocate_links(["web", "peer", "offline", "gate", "client"], SUBNET),
        )
        made.apply(SPEC)
        in_peer = [QNIX, "run", "peer", "--", "python3", "-c", SERVE, f"0.0.0.0:{PEER_PORT}"]
        servers.append(server(in_peer, env=host.env))
        yield made
    finally:
        stop_servers(servers)
        host.close()


def test_the_firewall_allows_one_port_and_not_the_other(lab: Lab) -> None:
    targets = ((UPSTREAM, ALLOWED), (UPSTREAM, DENIED))
    # Upstream sees the host's address: compartment traffic leaves masqueraded.
    assert lab.probe("web", *targets) == [f"ok {HOST_UPLINK}", "timeout"]
    # Control: with the rule naming the second port too, it answers.
    lab.apply(WIDER)
    try:
        assert lab.probe("web", *targets) == [f"ok {HOST_UPLINK}", f"ok {HOST_UPLINK}"]
    finally:
        lab.apply(SPEC)
    assert lab.probe("web", *targets) == [f"ok {HOST_UPLINK}", "timeout"]


def test_a_client_leaves_through_its_net_compartment_under_its_own_rules(lab: Lab) -> None:
    targets = ((UPSTREAM, ALLOWED), (UPSTREAM, DENIED))
    # gate may send anything, but client's own allow-list is applied to what client sends.
    assert lab.probe("client", *targets) == [f"ok {HOST_UPLINK}", "timeout"]
    # Control for the route: without the host's rule into gate, client gets nowhere.
    client_if = names.host_ifname("client")
    table = route_table(lab.links["gate"], SUBNET)
    rule = ["rule", "del", "iif", client_if, "table", str(table)]
    subprocess.run([lab.host.ip, "-n", lab.host.host_netns, *rule], check=True)
    try:
        assert lab.probe("client", *targets) == ["timeout", "timeout"]
    finally:
        assert lab.apply(SPEC).splitlines()[0].startswith("client: link ")
    assert lab.probe("client", *targets) == [f"ok {HOST_UPLINK}", "timeout"]


def test_a_compartment_without_network_has_only_loopback(lab: Lab) -> None:
    listing = lab.host.ok("run", "offline", "--", "cat", "/proc/net/dev")
    assert [line.split(":")[0].strip() for line in listing.splitlines()[2:]] == ["lo"]
    targets = ((UPSTREAM, ALLOWED), (lab.links["web"].gateway, HOST_ANY))
    assert lab.probe("offline", *targets) == [f"error {ENETUNREACH}", f"error {ENETUNREACH}"]
    # Control: the same probe from a compartment with a network reaches both.
    web_address = lab.links["web"].address
    lab.host.nft("delete", "table", "inet", "qnix")
    try:
        assert lab.probe("web", *targets) == [f"ok {web_address}", f"ok {web_address}"]
    finally:
        lab.apply(SPEC)


def test_one_compartment_cannot_reach_another(lab: Lab) -> None:
    web, peer = lab.links["web"].address, lab.links["peer"].address
    # web's firewall allows this port anywhere; the table still keeps compartments apart.
    assert lab.probe("web", (peer, PEER_PORT)) == ["timeout"]
    # Control: an opening, as the policy (qnix.Net) would add it, lets exactly this through.
    element = f"{{ {web} . {peer} . tcp . {PEER_PORT} }}"
    lab.host.nft("add", "element", "inet", "qnix", "openings", element)
    try:
        assert lab.probe("web", (peer, PEER_PORT)) == [f"ok {web}"]
    finally:
        lab.host.nft("delete", "element", "inet", "qnix", "openings", element)
    assert lab.probe("web", (peer, PEER_PORT)) == ["timeout"]


def test_a_compartment_cannot_reach_the_host(lab: Lab) -> None:
    web = lab.links["web"]
    targets = (
        (web.gateway, HOST_ANY),
        (HOST_UPLINK, HOST_ANY),
        (lab.links["peer"].gateway, HOST_ANY),
    )
    assert lab.probe("web", *targets) == ["timeout", "timeout", "timeout"]
    # Control: without the table the host answers on every address.
    lab.host.nft("delete", "table", "inet", "qnix")
    try:
        assert lab.probe("web", *targets) == [f"ok {web.address}"] * 3
    finally:
        assert lab.apply(SPEC).splitlines()[0].startswith("loaded nft table inet qnix")
    assert lab.probe("web", *targets) == ["timeout", "timeout", "timeout"]


def test_a_disposable_gets_its_templates_firewall_and_nothing_more(lab: Lab) -> None:
    peer = lab.links["peer"].address
    targets = [[UPSTREAM, ALLOWED], [UPSTREAM, DENIED], [peer, PEER_PORT]]

    def dispose() -> list[str]:
        result = lab.host.qnix(
            "dispose", "--template", "dvm", "--", "python3", "-c", PROBE, json.dumps(targets)
        )
        lab.host.disposables_gone()  # the next one is disp1 again
        assert result.returncode == 0, result.stderr
        answers: list[str] = json.loads(result.stdout)
        return answers

    # The disposable leaves through gate like any client of it, masqueraded on the way out.
    assert dispose() == [f"ok {HOST_UPLINK}", "timeout", "timeout"]
    # Control: with the template's rule naming the second port, that port answers.
    lab.apply(WIDER)
    try:
        assert dispose() == [f"ok {HOST_UPLINK}", f"ok {HOST_UPLINK}", "timeout"]
    finally:
        lab.apply(SPEC)
    # Control: its template allows the peer's port anywhere, yet only an opening for the
    # disposable's own address (the one `qnix dispose` gives disp1) lets it reach the peer.
    ws = load(lab.host.spec(SPEC)).workstation
    address = disposables.disposable_link(ws, "disp1", set()).address
    element = f"{{ {address} . {peer} . tcp . {PEER_PORT} }}"
    lab.host.nft("add", "element", "inet", "qnix", "openings", element)
    try:
        assert dispose() == [f"ok {HOST_UPLINK}", "timeout", f"ok {address}"]
    finally:
        lab.host.nft("delete", "element", "inet", "qnix", "openings", element)
    assert not lab.host.paths.netns_path("disp1").exists()
    assert names.host_ifname("disp1") not in (lab.host.net.table_listing() or "")


def test_a_compartment_cannot_reach_the_hosts_loopback(lab: Lab) -> None:
    # Its 127.0.0.1 is its own: nothing listens there.
    assert lab.probe("web", ("127.0.0.1", HOST_LOOPBACK)) == [f"error {ECONNREFUSED}"]
    # Nor through the host's addresses: the service is bound to the host's loopback only.
    assert lab.probe("web", (lab.links["web"].gateway, HOST_LOOPBACK)) == ["timeout"]
    # Control: the same probe in a sandbox that shares the host's network namespace (what a
    # compartment would be without a namespace of its own) reaches the service.
    shared = Sandbox(f"/run/netns/{lab.host.host_netns}")
    outcome = shared.run(py(PROBE, json.dumps([["127.0.0.1", HOST_LOOPBACK]])))
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads(outcome.stdout) == ["ok 127.0.0.1"]
