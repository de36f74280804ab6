"""`qnix drift` on a stand-in host: nothing after apply; then one hand-made change at a time,
each reported with its kind and subject (exit code 1) and gone after the next `qnix apply`.

Every change is made inside the stand-in host's namespaces and run root, never to the real
host's ruleset, links or kernel parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from qnix.compile import names
from qnix.runtime import hostowner
from qnix.runtime.net import route_table
from qnix.runtime.wanted import Difference, compare_listings, listing_of
from tests.conftest import need
from tests.runtime.livehost import LiveHost

SUBNET = "10.207.0.0/16"
LINKS = names.allocate_links(["gate", "client", "server", "offline"], SUBNET)
OPEN_PORT = 8080

# A net compartment and its client (routing rules and a table into it, a masquerade inside,
# kernel parameters), a running compartment, one without network, a host name resolved into
# a set, and an opening from the policy.
SPEC = f"""\
[host]
hostname = "lab"
subnet = "{SUBNET}"

[compartments.gate]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{{ cidr = "0.0.0.0/0" }}]

[compartments.client]
network = "gate"
memory_mb = 128
firewall = [{{ proto = "tcp", host = "localhost", ports = [80] }}]

[compartments.server]
network = "uplink"
autostart = true
memory_mb = 128

[compartments.offline]
memory_mb = 64

[policy]
rules = ["qnix.Net +tcp+{OPEN_PORT} client server allow"]
"""


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        made.ok("apply", str(made.spec(SPEC)))
        yield made
    finally:
        made.close()


def drift(host: LiveHost) -> tuple[int, list[dict[str, Any]]]:
    result = host.qnix("drift", "--json")
    assert result.returncode in (0, 1), result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return result.returncode, found


def difference(kind: str, subject: str, expected: str | None, actual: str | None) -> Any:
    return Difference(kind, subject, expected, actual).to_json()


def reapplied_clean(host: LiveHost) -> None:
    host.ok("apply", str(host.paths.run_root.parent / "spec.toml"))
    assert drift(host) == (0, [])


def in_host(host: LiveHost, *argv: str) -> None:
    subprocess.run([host.ip, "netns", "exec", host.host_netns, *argv], check=True)


def last_audit_entry(host: LiveHost) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(host.paths.audit_log.read_text().splitlines()[-1])
    return entry


# ---- pure: comparing listings ------------------------------------------------------------------

LISTING = """\
table inet qnix {
\tset openings {
\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service
\t\telements = { 10.0.0.1 . 10.0.0.3 . tcp . 8080,
\t\t\t     10.0.0.1 . 10.0.0.5 . udp . 53 }
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "qx*" jump from_compartment
\t\toifname "qx*" jump to_compartment
\t}
}
"""


def test_listings_are_compared_rule_by_rule_and_element_by_element() -> None:
    assert compare_listings(LISTING, LISTING) == []
    changed = (
        LISTING.replace("policy accept;", "policy drop;")
        .replace('oifname "qx*" jump to_compartment', 'oifname "qx*" accept')
        .replace("10.0.0.1 . 10.0.0.5 . udp . 53 }", "10.0.0.1 . 10.0.0.5 . udp . 54 }")
    )
    assert compare_listings(LISTING, changed) == [
        Difference(
            "nft-chain",
            "chain forward",
            "type filter hook forward priority filter; policy accept;",
            "type filter hook forward priority filter; policy drop;",
        ),
        Difference(
            "nft-rule", "chain forward", 'oifname "qx*" jump to_compartment', 'oifname "qx*" accept'
        ),
        Difference("nft-element", "set openings", "10.0.0.1 . 10.0.0.5 . udp . 53", None),
        Difference("nft-element", "set openings", None, "10.0.0.1 . 10.0.0.5 . udp . 54"),
    ]
    without_chain = LISTING[: LISTING.index("\tchain forward")].rstrip("\n") + "\n}\n"
    assert compare_listings(LISTING, without_chain) == [
        Difference("nft-chain", "chain forward", "present", None)
    ]


def test_nft_lists_a_transaction_in_a_namespace_of_its_own() -> None:
    """The expected listing is nft's own normal form of the text (element order, spacing,
    one rule per line), made without touching this namespace's ruleset."""
    need("nft")
    need("unshare")
    text = (
        "table inet qnix {\n\tset openings {\n"
        "\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service\n"
        "\t\telements = { 10.0.0.1 . 10.0.0.5 . udp . 53, 10.0.0.1 . 10.0.0.3 . tcp . 8080 }\n"
        "\t}\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n"
        '\t\tiifname "qx*" jump from_compartment\n\t\toifname "qx*" jump to_compartment\n'
        "\t}\n\tchain from_compartment {\n\t}\n\tchain to_compartment {\n\t}\n}\n"
    )
    listed = listing_of(text)
    assert "priority filter; policy accept;" in listed
    assert compare_listings(LISTING, listed) == [
        Difference("nft-chain", "chain from_compartment", None, "present"),
        Difference("nft-chain", "chain to_compartment", None, "present"),
    ]


# ---- live, on the stand-in host ----------------------------------------------------------------


def test_after_apply_nothing_drifts_and_the_check_is_audited(host: LiveHost) -> None:
    # The table carries its owner's mark (qnix.runtime.hostowner), which is no drift.
    mark = f"qnix run root {host.paths.run_root} netns prefix {host.prefix}"
    assert host.net.table_comment() == mark
    result = host.qnix("drift")
    assert (result.returncode, result.stdout) == (
        0,
        "no drift: the host matches the live generation\n",
    )
    entry = last_audit_entry(host)
    assert (entry["event"], entry["count"]) == ("drift", 0)


def test_a_rule_added_by_hand(host: LiveHost) -> None:
    in_host(host, need("nft"), "add", "rule", "inet", "qnix", "forward", "accept")
    assert drift(host) == (1, [difference("nft-rule", "chain forward", None, "accept")])
    result = host.qnix("drift")
    assert (result.returncode, result.stdout) == (
        1,
        "nft-rule chain forward: unexpected accept\n1 difference from the live generation\n",
    )
    entry = last_audit_entry(host)
    assert (entry["event"], entry["count"]) == ("drift", 1)
    reapplied_clean(host)


def test_an_opening_deleted_by_hand(host: LiveHost) -> None:
    element = f"{LINKS['client'].address} . {LINKS['server'].address} . tcp . {OPEN_PORT}"
    nft = need("nft")
    in_host(host, nft, "delete", "element", "inet", "qnix", "openings", f"{{ {element} }}")
    assert drift(host) == (1, [difference("nft-element", "set openings", element, None)])
    reapplied_clean(host)


def test_a_net_compartments_masquerade_table_changed_by_hand(host: LiveHost) -> None:
    gate = host.net.netns("gate")
    subprocess.run(
        [
            host.ip,
            "netns",
            "exec",
            gate,
            need("nft"),
            "flush",
            "chain",
            "ip",
            "qnix_net",
            "postrouting",
        ],
        check=True,
    )
    code, found = drift(host)
    assert code == 1
    assert [(d["kind"], d["subject"]) for d in found] == [("nft-rule", "gate: chain postrouting")]
    reapplied_clean(host)


def test_a_deleted_veth(host: LiveHost) -> None:
    server_end = names.host_ifname("server")
    in_host(host, host.ip, "link", "del", server_end)
    pair = f"veth {server_end} <-> {host.prefix}server:eth0"
    assert drift(host) == (1, [difference("link", server_end, pair, None)])
    reapplied_clean(host)


def test_a_routing_rule_and_an_address_changed_by_hand(host: LiveHost) -> None:
    client_end, server_end = names.host_ifname("client"), names.host_ifname("server")
    table = route_table(LINKS["gate"], SUBNET)
    in_host(host, host.ip, "rule", "del", "iif", client_end, "table", str(table))
    in_host(host, host.ip, "addr", "add", "192.0.2.1/32", "dev", server_end)
    into_main = f"priority 19999 to {SUBNET} table main"
    gateway = f"{LINKS['server'].gateway}/31"
    assert drift(host) == (
        1,
        [
            difference("address", server_end, gateway, f"{gateway}, 192.0.2.1/32"),
            difference("rule", client_end, f"{into_main}; priority 20000 table {table}", into_main),
        ],
    )
    reapplied_clean(host)


def test_changed_kernel_parameters(host: LiveHost) -> None:
    sysctl = need("sysctl")
    in_host(host, sysctl, "-q", "-w", "net.ipv4.ip_forward=0")
    assert drift(host) == (1, [difference("sysctl", "host net.ipv4.ip_forward", "1", "0")])
    reapplied_clean(host)
    gate = f"{host.prefix}gate"
    key = "net.ipv4.conf.all.send_redirects"
    subprocess.run([host.ip, "netns", "exec", gate, sysctl, "-q", "-w", f"{key}=1"], check=True)
    assert drift(host) == (1, [difference("sysctl", f"gate {key}", "0", "1")])
    reapplied_clean(host)


def test_a_modified_file_of_the_live_generation(host: LiveHost) -> None:
    policy = host.paths.generation_dir / "policy" / "00-spec.policy"
    before = hashlib.sha256(policy.read_bytes()).hexdigest()
    with policy.open("a") as handle:
        handle.write("qnix.Net +tcp+22 @anyvm @anyvm allow\n")
    after = hashlib.sha256(policy.read_bytes()).hexdigest()
    assert drift(host) == (1, [difference("generation", "policy/00-spec.policy", before, after)])
    reapplied_clean(host)
    assert hashlib.sha256(policy.read_bytes()).hexdigest() == before


def test_a_stray_namespace_and_a_dead_keeper(host: LiveHost) -> None:
    stray = f"{host.prefix}ghost"
    subprocess.run([host.ip, "netns", "add", stray], check=True)
    state = json.loads(host.paths.state_file("server").read_text())
    os.kill(int(state["keeper_pid"]), signal.SIGKILL)
    assert drift(host) == (
        1,
        [
            difference("netns", stray, None, "present"),
            difference("compartment", "server", "running", "crashed (its keeper is gone)"),
        ],
    )
    host.ok("gc")
    assert drift(host) == (1, [difference("compartment", "server", "running", "stopped")])
    reapplied_clean(host)


def test_without_a_live_generation_leftovers_are_drift(host: LiveHost) -> None:
    host.ok("down")
    assert drift(host) == (0, [])
    in_host(host, need("nft"), "add", "table", "inet", "qnix")
    assert drift(host) == (1, [difference("nft-table", "inet qnix", None, "present")])
    in_host(host, need("nft"), "delete", "table", "inet", "qnix")


def test_a_firewall_reload_that_replaces_the_table_is_undone_by_gc(host: LiveHost) -> None:
    """What a distribution's nftables.service does on reload (flush the ruleset, load its own
    copy of the generation's table: no host names resolved, no owner mark), and then a flush
    alone; the boot unit's reload runs `qnix gc`, which puts back the table qnix loaded."""
    reapplied_clean(host)  # whatever the tests before left
    nft = need("nft")
    static = host.paths.generation_dir / "nftables" / "qnix.nft"
    for replace in ([["flush", "ruleset"], ["-f", str(static)]], [["flush", "ruleset"]]):
        for argv in replace:
            in_host(host, nft, *argv)
        # Control: the replaced (or missing) table is drift until gc runs.
        assert drift(host)[0] == 1
        assert host.net.table_comment() in (None, "")
        assert "put back the nft table inet qnix as qnix last loaded it" in host.ok("gc")
        assert drift(host) == (0, [])
        assert host.net.table_comment() == hostowner.owner_mark(host.paths)
    # Nothing replaced: gc leaves the table alone.
    assert "nft table" not in host.ok("gc")
