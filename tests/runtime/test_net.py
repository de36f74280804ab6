"""HostNetwork on real namespaces: created idempotently, removed completely, listed; the table
replaced in one transaction. A namespace the test makes plays the host, so the real host's
links, routes and ruleset are never touched."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.names import Link, host_ifname
from qnix.errors import QnixError
from qnix.runtime import netlink, nft
from qnix.runtime.net import (
    NET_COMPARTMENT_TABLE,
    ROUTE_TABLE_BASE,
    RULE_PRIORITY,
    HostNetwork,
    NetRoute,
    Uplink,
    route_table,
    table_comment,
)
from tests.conftest import need

TAG = secrets.token_hex(3)
PREFIX = f"qxn{TAG}-"
HOST_NETNS = f"qxn{TAG}host"

NET = Link("10.201.0.2", "10.201.0.3")
CLIENT = Link("10.201.0.4", "10.201.0.5")


def ip(*args: str) -> str:
    return subprocess.run([need("ip"), *args], check=True, capture_output=True, text=True).stdout


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    text = subprocess.run(
        [need("ip"), "-n", netns, "-j", *args], check=False, capture_output=True, text=True
    ).stdout
    parsed: list[dict[str, Any]] = json.loads(text) if text.strip() else []
    return parsed


def sysctl_outside(netns: str, key: str) -> str:
    """A kernel parameter as the `sysctl` tool sees it from inside `netns`."""
    command = [need("ip"), "netns", "exec", netns, need("sysctl"), "-n", key]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def ip_nft(netns: str, *args: str) -> str:
    """What the `nft` tool lists inside `netns`."""
    command = [need("ip"), "netns", "exec", netns, need("nft"), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def mine() -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith(f"qxn{TAG}")}


def snapshot(net: HostNetwork, *compartments: str) -> dict[str, Any]:
    """Everything the host and compartment namespaces hold that HostNetwork manages."""
    found: dict[str, Any] = {}
    for netns in (HOST_NETNS, *(net.netns(c) for c in compartments)):
        found[netns] = {
            "addr": [
                (e["ifname"], a["local"], a["prefixlen"], "UP" in e["flags"])
                for e in ip_json(netns, "-4", "addr", "show")
                for a in e.get("addr_info", [])
            ],
            "routes": ip_json(netns, "-4", "route", "show", "table", "all"),
            "rules": ip_json(netns, "-4", "rule", "show"),
        }
    return found


def host_qnix_links() -> list[str]:
    """qnix links in the namespace the tests run in (the real host's): never touched here."""
    return HostNetwork().list_links()


@pytest.fixture(scope="module")
def net() -> Iterator[HostNetwork]:
    links_before = host_qnix_links()
    assert not mine()
    ip("netns", "add", HOST_NETNS)
    try:
        yield HostNetwork(prefix=PREFIX, host_netns=HOST_NETNS)
    finally:
        for name in mine():
            ip("netns", "delete", name)
    assert not mine()
    assert host_qnix_links() == links_before


@pytest.fixture
def two(net: HostNetwork) -> Iterator[tuple[Uplink, Uplink]]:
    """A net compartment on the uplink and a client behind it, removed afterwards."""
    net_uplink = Uplink(host_ifname("tn-net"), NET)
    client_uplink = Uplink(
        host_ifname("tn-client"),
        CLIENT,
        NetRoute(20001, NET.address, host_ifname("tn-net"), "10.201.0.0/16"),
    )
    try:
        yield net_uplink, client_uplink
    finally:
        for name in ("tn-client", "tn-net"):
            net.remove_link(host_ifname(name))
            net.remove_netns(name)
        assert net.list_links() == []
        assert net.list_netns() == []


def test_netns_is_created_once_with_loopback_up(net: HostNetwork) -> None:
    assert net.ensure_netns("tn-a") is True
    try:
        assert net.ensure_netns("tn-a") is False
        assert net.list_netns() == ["tn-a"]
        assert net.netns_path("tn-a").exists()
        assert [(e["ifname"], "UP" in e["flags"]) for e in ip_json(f"{PREFIX}tn-a", "link")] == [
            ("lo", True)
        ]
    finally:
        assert net.remove_netns("tn-a") is True
    assert net.remove_netns("tn-a") is False
    assert net.list_netns() == []


def test_links_routes_and_rules_are_idempotent(
    net: HostNetwork, two: tuple[Uplink, Uplink]
) -> None:
    net_uplink, client_uplink = two
    for name in ("tn-net", "tn-client"):
        assert net.ensure_netns(name) is True
    assert net.ensure_link("tn-net", net_uplink) is True
    assert net.ensure_link("tn-client", client_uplink) is True
    first = snapshot(net, "tn-net", "tn-client")
    assert net.ensure_link("tn-net", net_uplink) is False
    assert net.ensure_link("tn-client", client_uplink) is False
    assert snapshot(net, "tn-net", "tn-client") == first

    host = first[HOST_NETNS]
    assert sorted(host["addr"]) == sorted(
        [
            (host_ifname("tn-net"), "10.201.0.2", 31, True),
            (host_ifname("tn-client"), "10.201.0.4", 31, True),
        ]
    )
    rules = [
        (r["priority"], r["iif"], r.get("dst"), r.get("dstlen"), r["table"])
        for r in host["rules"]
        if "iif" in r
    ]
    assert rules == [
        (RULE_PRIORITY - 1, host_ifname("tn-client"), "10.201.0.0", 16, "main"),
        (RULE_PRIORITY, host_ifname("tn-client"), None, None, "20001"),
    ]
    table = [r for r in host["routes"] if r.get("table") == "20001"]
    assert [(r["dst"], r["gateway"], r["dev"]) for r in table] == [
        ("default", "10.201.0.3", host_ifname("tn-net"))
    ]
    client = first[f"{PREFIX}tn-client"]
    assert client["addr"] == [("lo", "127.0.0.1", 8, True), ("eth0", "10.201.0.5", 31, True)]
    defaults = [r for r in client["routes"] if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in defaults] == [("10.201.0.4", "eth0")]
    assert net.list_links() == sorted([host_ifname("tn-net"), host_ifname("tn-client")])
    assert net.list_rule_interfaces() == [host_ifname("tn-client")]


def test_a_changed_address_replaces_the_old_one(
    net: HostNetwork, two: tuple[Uplink, Uplink]
) -> None:
    net_uplink, _ = two
    net.ensure_netns("tn-net")
    net.ensure_link("tn-net", net_uplink)
    moved = Uplink(net_uplink.host_ifname, Link("10.201.9.0", "10.201.9.1"))
    assert net.ensure_link("tn-net", moved) is True
    addresses = snapshot(net, "tn-net")
    assert [a for a in addresses[HOST_NETNS]["addr"] if a[0] != "lo"] == [
        (host_ifname("tn-net"), "10.201.9.0", 31, True)
    ]
    assert addresses[f"{PREFIX}tn-net"]["addr"][1:] == [("eth0", "10.201.9.1", 31, True)]


def test_removal_takes_link_peer_and_rule(net: HostNetwork, two: tuple[Uplink, Uplink]) -> None:
    net_uplink, client_uplink = two
    for name, uplink in (("tn-net", net_uplink), ("tn-client", client_uplink)):
        net.ensure_netns(name)
        net.ensure_link(name, uplink)
    assert net.remove_link(client_uplink.host_ifname) is True
    assert net.remove_link(client_uplink.host_ifname) is False
    assert net.list_links() == [net_uplink.host_ifname]
    assert net.list_rule_interfaces() == []
    assert [e["ifname"] for e in ip_json(f"{PREFIX}tn-client", "link")] == ["lo"]
    # Removing the namespace takes the veth with it, on both sides.
    assert net.remove_netns("tn-net") is True
    assert net.list_links() == []


def test_a_rule_without_its_link_is_listed_and_removed(net: HostNetwork) -> None:
    ghost = host_ifname("tn-ghost")
    ip("-n", HOST_NETNS, "rule", "add", "iif", ghost, "table", "20009", "priority", "20000")
    assert net.list_rule_interfaces() == [ghost]
    assert net.remove_link(ghost) is True
    assert net.list_rule_interfaces() == []


def test_net_compartment_forwards_and_masquerades_once(
    net: HostNetwork, two: tuple[Uplink, Uplink]
) -> None:
    net_uplink, _ = two
    net.ensure_netns("tn-net")
    net.ensure_link("tn-net", net_uplink)
    assert net.ensure_net_compartment("tn-net", net_uplink.host_ifname) is True
    assert net.ensure_net_compartment("tn-net", net_uplink.host_ifname) is False
    inside = net.netns("tn-net")
    assert net.sysctl(inside, "net.ipv4.ip_forward") == "1"
    assert net.sysctl(inside, "net.ipv4.conf.all.send_redirects") == "0"
    assert net.sysctl(HOST_NETNS, f"net.ipv4.conf.{net_uplink.host_ifname}.rp_filter") == "2"
    listing = net.nft_listing(inside, NET_COMPARTMENT_TABLE)
    assert listing is not None
    assert 'oifname "eth0" masquerade' in listing
    # Written from inside each namespace in-process, they landed there, as tools see them.
    assert sysctl_outside(inside, "net.ipv4.ip_forward") == "1"
    assert sysctl_outside(inside, "net.ipv4.conf.eth0.send_redirects") == "0"
    key = f"net.ipv4.conf.{net_uplink.host_ifname}.rp_filter"
    assert sysctl_outside(HOST_NETNS, key) == "2"
    table = ip_nft(inside, "list", "table", *NET_COMPARTMENT_TABLE.split())
    assert table == listing


def test_route_table_is_the_net_compartments_slot() -> None:
    assert route_table(Link("10.137.0.2", "10.137.0.3"), "10.137.0.0/16") == ROUTE_TABLE_BASE + 1
    assert route_table(Link("10.137.1.0", "10.137.1.1"), "10.137.0.0/16") == ROUTE_TABLE_BASE + 128


GOOD = """\
table inet qnix {
\tset marks {
\t\ttype ipv4_addr
\t\telements = { 192.0.2.1 }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "qx*" drop
\t}
}
"""
OTHER = """\
table inet qnix {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "qx*" drop
\t}
}
"""


def test_table_load_replaces_the_whole_table_atomically(net: HostNetwork) -> None:
    assert net.table_listing() is None
    assert net.delete_table() is False
    try:
        net.load_table(GOOD)
        first = net.table_listing()
        assert first is not None
        assert "192.0.2.1" in first
        assert 'iifname "qx*" drop' in first
        # A replacement, not a merge: the set and chain of the first table are gone.
        net.load_table(OTHER)
        second = net.table_listing()
        assert second is not None
        assert "chain forward" in second
        assert "marks" not in second
        assert "chain input" not in second
        # A ruleset that fails half-way (an element for a set that does not exist) changes
        # nothing: the transaction is all or nothing.
        broken = GOOD + "add element inet qnix no_such_set { 192.0.2.9 }\n"
        with pytest.raises(QnixError, match="no_such_set"):
            net.load_table(broken)
        assert net.table_listing() == second
        # Statements after the table are part of the same transaction.
        net.load_table(GOOD + "add element inet qnix marks { 192.0.2.7 }\n")
        third = net.table_listing()
        assert third is not None
        assert "192.0.2.1, 192.0.2.7" in third
    finally:
        net.delete_table()
    assert net.table_listing() is None
    assert net.has_table() is False


def test_a_table_comment_is_set_by_the_load_and_read_back(net: HostNetwork) -> None:
    """The comment comes with the table's first declaration in the transaction (nft keeps no
    later one), survives the ruleset's own `table` block, and goes with the table."""
    assert net.table_comment() is None
    try:
        net.load_table(GOOD, comment="qnix run root /run/qnix")
        assert net.table_comment() == "qnix run root /run/qnix"
        listing = net.table_listing()
        assert listing is not None
        assert table_comment(listing) == "qnix run root /run/qnix"
        assert "192.0.2.1" in listing
        net.load_table(OTHER, comment="qnix run root /srv/run")
        assert net.table_comment() == "qnix run root /srv/run"
        net.load_table(OTHER)
        assert net.table_comment() is None
    finally:
        net.delete_table()
    assert net.table_comment() is None
    # A chain's comment is not the table's.
    assert table_comment('table inet qnix {\n\tchain c {\n\t\tcomment "x"\n\t}\n}\n') is None


def test_names_resolve_from_the_host_namespace_files_first(net: HostNetwork) -> None:
    # /etc/hosts answers localhost; the test host namespace has no route, so the query for the
    # unknown name fails inside it and never leaves the machine.
    assert net.resolve([("localhost", 4), ("qnix-unknown.invalid", 4)]) == {
        ("localhost", 4): ("127.0.0.1",),
        ("qnix-unknown.invalid", 4): (),
    }
    assert net.resolve([]) == {}


def test_a_refused_netlink_step_names_itself_the_namespace_and_the_kernels_reason(
    net: HostNetwork, two: tuple[Uplink, Uplink]
) -> None:
    net_uplink, client_uplink = two
    for name in ("tn-net", "tn-client"):
        net.ensure_netns(name)
    net.ensure_link("tn-net", net_uplink)
    # A route into the net compartment via an address that is not on its link.
    off_link = NetRoute(20001, "10.77.0.1", net_uplink.host_ifname, "10.201.0.0/16")
    with pytest.raises(QnixError) as refused:
        net.ensure_link("tn-client", Uplink(client_uplink.host_ifname, CLIENT, off_link))
    assert refused.value.message == (
        f"netlink: {HOST_NETNS}: replace default route via 10.77.0.1 dev "
        f"{net_uplink.host_ifname} table 20001 failed: Network is unreachable (ENETUNREACH)"
    )
    assert net.list_rule_interfaces() == []  # the rules come after the route
    with pytest.raises(QnixError, match=f"network namespace {PREFIX}tn-none does not exist"):
        net.ensure_link("tn-none", net_uplink)


def test_debug_names_each_step_and_the_exact_transaction(
    net: HostNetwork, two: tuple[Uplink, Uplink], caplog: pytest.LogCaptureFixture
) -> None:
    net_uplink, _ = two
    caplog.set_level(logging.DEBUG, logger="qnix.net")
    net.ensure_netns("tn-net")
    net.ensure_link("tn-net", net_uplink)
    try:
        net.load_table(GOOD)
    finally:
        net.delete_table()
    inside, host_end = net.netns("tn-net"), net_uplink.host_ifname
    said = [record.getMessage() for record in caplog.records if record.name == "qnix.net"]
    for line in (
        f"netns: {inside}: add (bound at /run/netns/{inside})",
        f"netlink: {inside}: set lo up",
        f"netlink: {HOST_NETNS}: add veth {host_end} <-> {inside}:eth0",
        f"netlink: {HOST_NETNS}: add address 10.201.0.2/31 to {host_end}",
        f"netlink: {inside}: replace default route via 10.201.0.2 dev eth0",
        f"nft: {HOST_NETNS}: transaction:\ntable inet qnix\ndelete table inet qnix\n{GOOD.strip()}",
        f"nft: {HOST_NETNS}: delete table inet qnix",
    ):
        assert line in said


def test_namespace_work_on_a_thread_moves_that_thread_only_and_back(
    net: HostNetwork, two: tuple[Uplink, Uplink]
) -> None:
    """The keeper's call server makes disposables on threads: entering a namespace there must
    leave every other thread where it is, and the thread itself where it was."""
    net_uplink, _ = two
    own = os.readlink("/proc/thread-self/ns/net")
    seen: dict[str, object] = {}

    def work() -> None:
        before = os.readlink("/proc/thread-self/ns/net")
        seen["changed"] = net.ensure_netns("tn-net") and net.ensure_link("tn-net", net_uplink)
        seen["moved"] = os.readlink("/proc/thread-self/ns/net") != before

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"changed": True, "moved": False}
    assert os.readlink("/proc/thread-self/ns/net") == own
    assert net.list_links() == [net_uplink.host_ifname]
    assert [e["ifname"] for e in ip_json(net.netns("tn-net"), "link")] == ["lo", "eth0"]


def test_libnftables_is_found_beside_nft_as_on_nixos(net: HostNetwork, tmp_path: Path) -> None:
    """On NixOS no loader path holds libnftables, but the `nft` in PATH is a link into its
    package, whose lib/ has it."""
    ctypes.CDLL(nft.SONAME)  # the system's, through the loader: where is it?
    maps = Path("/proc/self/maps").read_text().splitlines()
    system_library = next(line.split()[-1] for line in maps if "/libnftables.so" in line)
    package = tmp_path / "store" / "nftables-1.0"
    (package / "bin").mkdir(parents=True)
    (package / "lib").mkdir()
    shutil.copy(need("nft"), package / "bin" / "nft")
    (package / "lib" / nft.SONAME).symlink_to(system_library)
    profile = tmp_path / "profile" / "bin"
    profile.mkdir(parents=True)
    (profile / "nft").symlink_to(package / "bin" / "nft")
    path = os.environ["PATH"]
    os.environ["PATH"] = str(profile)
    try:
        beside = nft._library_beside_nft()
    finally:
        os.environ["PATH"] = path
    assert beside == str(package / "lib" / nft.SONAME)
    import nftables  # type: ignore[import-untyped]

    with netlink.entered(Path("/run/netns", HOST_NETNS), HOST_NETNS):
        rc, _, _ = nftables.Nftables(sofile=beside).cmd("list tables")
    assert rc == 0
