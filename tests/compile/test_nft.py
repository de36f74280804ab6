"""The nftables table: valid for nft, linear in size, injection-proof, and it segments for real.

`nft -c` (check mode) parses and validates the ruleset in the kernel without committing it, so it
never touches the host's live ruleset; the ruleset names no host, so nft resolves nothing. The
live test loads the table into network namespaces it creates and only talks between them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qnix.compile import names
from qnix.compile.inputs import load
from qnix.compile.nft import (
    MAX_COMMENT_BYTES,
    HostnameSet,
    chain_name,
    hostname_sets,
    quote,
    render_ruleset,
    render_table_body,
)
from qnix.runner import run
from qnix.spec.model import NETWORK_NONE, CompartmentBase, FirewallRule, Workstation
from tests.conftest import EXAMPLES, need
from tests.netprobes import PROBE, SERVE

SMB_OFFICE = EXAMPLES / "smb-office.toml"

# ---- reading the emitted text back ----------------------------------------------------------


@dataclass
class Table:
    """The members of an emitted table: rules per chain, elements per set or map."""

    chains: dict[str, list[str]] = field(default_factory=dict)
    chain_comments: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)
    sets: dict[str, list[str]] = field(default_factory=dict)
    set_types: dict[str, list[str]] = field(default_factory=dict)
    maps: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rules(self) -> int:
        return sum(len(rules) for rules in self.chains.values())

    @property
    def elements(self) -> int:
        return sum(len(e) for e in self.sets.values()) + sum(len(e) for e in self.maps.values())


def parse(text: str) -> Table:
    """Split the text by its layout: members at one tab, their lines at two, elements at three."""
    lines = text.splitlines()
    assert lines[0] == "table inet qnix {"
    assert lines[-1] == "}"
    table = Table()
    kind = name = ""
    for line in lines[1:-1]:
        if line in ("", "\t}", "\t\t}"):
            continue
        header = re.fullmatch(r"\t(chain|set|map) ([a-z0-9_]+) \{", line)
        if header:
            kind, name = header.groups()
            {"chain": table.chains, "set": table.sets, "map": table.maps}[kind][name] = []
            continue
        assert line.startswith("\t\t"), line
        if line.startswith("\t\t\t"):
            element = line.strip().removesuffix(",")
            (table.sets if kind == "set" else table.maps)[name].append(element)
            continue
        body = line[2:]
        if kind == "chain":
            if body.startswith("type "):
                table.hooks[name] = body
            elif body.startswith("comment "):
                table.chain_comments[name] = body
            else:
                table.chains[name].append(body)
        elif kind == "set" and body != "elements = {":
            table.set_types.setdefault(name, []).append(body)
    return table


def nft_check(text: str, tmp_path: Path) -> None:
    ruleset = tmp_path / "qnix.nft"
    ruleset.write_text(text)
    result = run([need("nft"), "-c", "-f", str(ruleset)], timeout=120, check=False)
    assert result.returncode == 0, result.stderr[:4000]


# ---- workstations ---------------------------------------------------------------------------


def tiny() -> Workstation:
    return Workstation.model_validate(
        {
            "host": {"hostname": "tiny"},
            "compartments": {
                "web": {
                    "network": "uplink",
                    "firewall": [
                        {
                            "proto": "tcp",
                            "cidr": "203.0.113.0/24",
                            "ports": [443],
                            "comment": "the web",
                        }
                    ],
                },
                "vault": {},
            },
        }
    )


def synthetic(count: int, comments: list[str] | None = None) -> Workstation:
    """`count` compartments in a cycle of five kinds: a net compartment, an uplink one,
    an offline one and two behind the latest net compartment; two or three rules each."""
    compartments: dict[str, Any] = {}
    net = ""
    for i in range(count):
        name = f"c{i:04d}"
        comment = comments[i % len(comments)] if comments else ""
        kind = i % 5
        if kind == 0:
            net = name
            body: dict[str, Any] = {
                "network": "uplink",
                "provides_network": True,
                "firewall": [
                    {"cidr": "0.0.0.0/0", "comment": comment},
                    {"proto": "udp", "cidr": "2001:db8::/32", "ports": ["500", "4500"]},
                ],
            }
        elif kind == 1:
            body = {
                "network": "uplink",
                "firewall": [
                    {"dns": True, "comment": comment},
                    {"proto": "tcp", "host": f"svc{i}.example.com", "ports": [443, "8000-8080"]},
                    {"proto": "udp", "cidr": "2001:db8::/32", "ports": ["53-60"]},
                ],
            }
        elif kind == 2:
            body = {"network": NETWORK_NONE}
        elif kind == 3:
            body = {
                "network": net,
                "firewall": [
                    {"proto": "tcp", "cidr": "198.51.100.0/24", "ports": [80, 443]},
                    {"proto": "icmp", "host": f"192.0.2.{i % 250 + 1}", "comment": comment},
                ],
            }
        else:
            body = {
                "network": net,
                "firewall": [
                    {"dns": True},
                    {"host": "2001:db8::1", "comment": comment},
                    {"proto": "tcp", "host": f"api{i}.example.org", "ports": ["8000-8080"]},
                ],
            }
        compartments[name] = body
    return Workstation.model_validate(
        {
            "host": {"hostname": "many", "dns_servers": ["192.0.2.53", "2001:db8::53"]},
            "compartments": compartments,
        }
    )


# The design's size, stated from the spec alone.
BASE_RULES = 13  # forward 2, input 1, postrouting 1, from_compartment 4, to_compartment 2,
# admitted 3
PER_COMPARTMENT_RULES = 2  # jump admitted, the way-out guard
BASE_CHAINS = 6
BASE_SETS = 3  # compartment_addrs, net_clients, openings


def rule_width(rule: FirewallRule, dns_servers: tuple[str, ...]) -> int:
    """nft rules one firewall rule becomes: one per address family it reaches."""
    if rule.dns:
        families = {ipaddress.ip_address(a).version for a in dns_servers}
        return max(1, len(families))
    if rule.host is not None:
        try:
            ipaddress.ip_address(rule.host)
        except ValueError:
            return 2  # a DNS name: its IPv4 set and its IPv6 set
    return 1


def expected_shape(ws: Workstation) -> dict[str, int]:
    networked = [c for c in ws.compartments.values() if c.network != NETWORK_NONE]
    # A disposable template with a network has a chain like a compartment's, and no elements.
    templates = [t for t in ws.disposable_templates.values() if t.network != NETWORK_NONE]
    chains: list[CompartmentBase] = [*networked, *templates]
    hostname_rules = sum(
        1 for c in chains for r in c.firewall if r.host is not None and rule_width(r, ()) == 2
    )
    behind_net = sum(1 for c in networked if c.network != "uplink")
    return {
        "rules": BASE_RULES
        + sum(
            PER_COMPARTMENT_RULES + sum(rule_width(r, ws.host.dns_servers) for r in c.firewall)
            for c in chains
        ),
        "chains": BASE_CHAINS + len(chains),
        "sets": BASE_SETS + 2 * hostname_rules,
        "maps": 1,
        "elements": 2 * len(networked) + behind_net,
    }


def shape(table: Table) -> dict[str, int]:
    return {
        "rules": table.rules,
        "chains": len(table.chains),
        "sets": len(table.sets),
        "maps": len(table.maps),
        "elements": table.elements,
    }


# ---- exact text -----------------------------------------------------------------------------

TINY_RULESET = """\
table inet qnix {
\tset compartment_addrs {
\t\ttype ipv4_addr
\t\telements = {
\t\t\t10.137.214.95
\t\t}
\t}

\tset net_clients {
\t\ttype ifname . ipv4_addr
\t}

\tset openings {
\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service
\t}

\tmap egress {
\t\ttype ifname . ipv4_addr : verdict
\t\telements = {
\t\t\t"qx4b5e57f6eb" . 10.137.214.95 : jump c_qx4b5e57f6eb
\t\t}
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "qx*" jump from_compartment
\t\toifname "qx*" jump to_compartment
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "qx*" drop
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tiifname "qx*" oifname != "qx*" masquerade
\t}

\tchain from_compartment {
\t\tct state invalid drop
\t\tiifname . ip daddr @net_clients ct direction reply ct state established,related accept
\t\tiifname . ip saddr vmap @egress
\t\tdrop
\t}

\tchain to_compartment {
\t\tct state established,related accept
\t\tdrop
\t}

\tchain admitted {
\t\tct state established,related accept
\t\tip saddr . ip daddr . meta l4proto . th dport @openings accept
\t\tip daddr @compartment_addrs drop
\t}

\tchain c_qx4b5e57f6eb {
\t\tcomment "web"
\t\tjump admitted
\t\toifname "qx*" drop
\t\tip daddr 203.0.113.0/24 tcp dport 443 accept comment "the web"
\t}
}
"""


def test_tiny_workstation_exact_text(tmp_path: Path) -> None:
    ws = tiny()
    assert names.host_ifname("web") == "qx4b5e57f6eb"
    assert names.allocate_links(ws.compartments, ws.host.subnet)["web"].address == ("10.137.214.95")
    assert render_ruleset(ws) == TINY_RULESET
    nft_check(TINY_RULESET, tmp_path)


def test_ruleset_is_the_body_in_the_table() -> None:
    ws = synthetic(10)
    assert render_ruleset(ws) == "table inet qnix {\n" + render_table_body(ws) + "}\n"


def test_output_is_deterministic() -> None:
    ws = synthetic(25)
    reordered = Workstation.model_validate(
        {
            **ws.model_dump(),
            "compartments": dict(reversed(ws.model_dump()["compartments"].items())),
        }
    )
    assert render_ruleset(reordered) == render_ruleset(ws)


def test_rule_expansion_exact_lines() -> None:
    ws = Workstation.model_validate(
        {
            "host": {"hostname": "x", "dns_servers": ["2001:db8::53", "192.0.2.53", "192.0.2.9"]},
            "compartments": {
                "net": {"network": "uplink", "provides_network": True},
                "a": {
                    "network": "net",
                    "firewall": [
                        {"dns": True},
                        {"proto": "tcp", "host": "Mail.Example.com", "ports": [993, 443, 444]},
                        {"proto": "udp", "cidr": "2001:db8::/48", "ports": ["1000-2000", 1500]},
                        {"proto": "icmp", "host": "2001:db8::7"},
                        {"proto": "icmp", "host": "mx.example.com"},
                        {"proto": "udp", "host": "192.0.2.1"},
                        {"cidr": "0.0.0.0/0", "comment": 'evil" } accept #;'},
                    ],
                },
            },
        }
    )
    table = parse(render_ruleset(ws))
    a = chain_name("a")
    assert table.chain_comments[a] == 'comment "a"'
    assert table.chains[a] == [
        "jump admitted",
        f'oifname != "{names.host_ifname("net")}" drop',
        "ip daddr { 192.0.2.9, 192.0.2.53 } meta l4proto { tcp, udp } th dport 53 accept",
        "ip6 daddr 2001:db8::53 meta l4proto { tcp, udp } th dport 53 accept",
        f"ip daddr @{a}_h1_4 tcp dport {{ 443-444, 993 }} accept",
        f"ip6 daddr @{a}_h1_6 tcp dport {{ 443-444, 993 }} accept",
        "ip6 daddr 2001:db8::/48 udp dport 1000-2000 accept",
        "ip6 daddr 2001:db8::7 meta l4proto ipv6-icmp accept",
        f"ip daddr @{a}_h4_4 meta l4proto icmp accept",
        f"ip6 daddr @{a}_h4_6 meta l4proto ipv6-icmp accept",
        "ip daddr 192.0.2.1 meta l4proto udp accept",
        'ip daddr 0.0.0.0/0 accept comment "evil_ _ accept __"',
    ]
    assert hostname_sets(ws) == (
        HostnameSet(f"{a}_h1_4", 4, "mail.example.com", "a"),
        HostnameSet(f"{a}_h1_6", 6, "mail.example.com", "a"),
        HostnameSet(f"{a}_h4_4", 4, "mx.example.com", "a"),
        HostnameSet(f"{a}_h4_6", 6, "mx.example.com", "a"),
    )
    assert table.set_types[f"{a}_h1_4"] == ["type ipv4_addr", "flags interval"]
    assert table.set_types[f"{a}_h1_6"] == ["type ipv6_addr", "flags interval"]
    assert table.sets[f"{a}_h1_4"] == []
    # No host name is handed to nft, so nft has nothing to resolve.
    assert "example" not in render_ruleset(ws).lower()


def test_dns_without_servers_allows_port_53_anywhere() -> None:
    ws = Workstation.model_validate(
        {
            "host": {"hostname": "x"},
            "compartments": {"a": {"network": "uplink", "firewall": [{"dns": True}]}},
        }
    )
    assert parse(render_ruleset(ws)).chains[chain_name("a")][2:] == [
        "meta l4proto { tcp, udp } th dport 53 accept"
    ]


def test_a_network_that_names_no_net_compartment_is_refused() -> None:
    ws = Workstation.model_validate(
        {"host": {"hostname": "x"}, "compartments": {"a": {"network": "b"}, "b": {}}}
    )
    with pytest.raises(ValueError, match="not a net compartment"):
        render_ruleset(ws)


# ---- nft accepts it, at any size ------------------------------------------------------------


def test_smb_office_passes_nft_check(tmp_path: Path) -> None:
    ws = load(SMB_OFFICE).workstation
    text = render_ruleset(ws)
    nft_check(text, tmp_path)
    assert shape(parse(text)) == expected_shape(ws)


def test_thousand_compartments_pass_nft_and_grow_linearly(tmp_path: Path) -> None:
    small, large = synthetic(50), synthetic(1000)
    small_text, large_text = render_ruleset(small), render_ruleset(large)
    nft_check(large_text, tmp_path)
    small_shape, large_shape = shape(parse(small_text)), shape(parse(large_text))
    assert small_shape == expected_shape(small)
    assert large_shape == expected_shape(large)
    # Every five compartments of `synthetic` add 4 + 7 + 0 + 4 + 7 rules and 2 + 2 + 0 + 3 + 3
    # elements (egress map and address set each, net_clients for the two behind a net).
    for count, measured in ((50, small_shape), (1000, large_shape)):
        assert measured["rules"] == BASE_RULES + 22 * count // 5
        assert measured["elements"] == 10 * count // 5
        assert measured["chains"] == BASE_CHAINS + 4 * count // 5
    ratio = large_shape["rules"] / small_shape["rules"]
    assert 1000 / 50 / 1.1 <= ratio <= 1000 / 50
    # No compartment adds more than the two fixed rules and two per firewall rule (3 at most).
    for count, measured in ((50, small_shape), (1000, large_shape)):
        assert measured["rules"] <= (PER_COMPARTMENT_RULES + 2 * 3) * count + BASE_RULES
        assert measured["elements"] <= 3 * count
        assert measured["chains"] <= count + BASE_CHAINS


# ---- hostile comments -----------------------------------------------------------------------

SAFE_QUOTED = re.compile(r'"[A-Za-z0-9 \-_.,:/+=()@!?%\'&]*"')


@given(st.text(max_size=400))
@example('"; } chain x { type filter hook input priority 0; policy accept; } #')
@example("\\\n\x00{};#$\"'\u202e\U0001f600")
@settings(max_examples=200, deadline=None)
def test_quote_yields_one_safe_string(text: str) -> None:
    quoted = quote(text)
    assert SAFE_QUOTED.fullmatch(quoted)
    assert len(quoted.encode()) <= MAX_COMMENT_BYTES + 2
    assert len(quoted) == min(len(text), MAX_COMMENT_BYTES) + 2


def test_quote_keeps_plain_text() -> None:
    assert quote("the bank's login, port 443 (TLS) & more!") == (
        '"the bank\'s login, port 443 (TLS) & more!"'
    )
    assert quote("") == '""'


COMMENT_CLAUSE = re.compile(r'comment "[^"]*"')
# What the spec model lets through as a comment: anything but control, format and unassigned
# characters; quotes, braces, `;`, `#`, `\`, `$` and line separators (U+2028) included.
SPEC_COMMENT_TEXT = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn")), min_size=1, max_size=200
)
HOSTILE = ['"; } chain x { accept } #', "\\", "}" * 200, "#;" * 100, "$x \u2028 \u00e9 \U0001f512"]


def with_raw_comments(ws: Workstation, comments: list[str]) -> Workstation:
    """`ws` with its comments replaced past validation (model_copy does not validate), as if
    something upstream of the compiler had let control characters through."""
    compartments = {}
    for i, (name, compartment) in enumerate(ws.compartments.items()):
        firewall = tuple(
            rule.model_copy(update={"comment": comments[i % len(comments)]})
            if rule.comment
            else rule
            for rule in compartment.firewall
        )
        compartments[name] = compartment.model_copy(update={"firewall": firewall})
    return ws.model_copy(update={"compartments": compartments})


def assert_only_comments_differ(hostile: Workstation, count: int, tmp_path: Path) -> None:
    text = render_ruleset(hostile)
    nft_check(text, tmp_path)
    # Cut every comment clause out: what remains is identical, so no comment escaped its quotes.
    benign = render_ruleset(synthetic(count, ["x"]))
    assert COMMENT_CLAUSE.sub('comment ""', text) == COMMENT_CLAUSE.sub('comment ""', benign)
    assert shape(parse(text)) == shape(parse(render_ruleset(synthetic(count))))


@given(comments=st.lists(SPEC_COMMENT_TEXT, min_size=1, max_size=40))
@example(comments=HOSTILE)
@settings(max_examples=8, deadline=None)
def test_hostile_spec_comments_change_nothing_but_comments(
    comments: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    count = 5 * len(comments)  # every comment lands in one rule of each of its five compartments
    hostile = synthetic(count, comments)  # the spec model accepts every one of them
    assert_only_comments_differ(hostile, count, tmp_path_factory.mktemp("nft"))


@given(comments=st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=40))
@example(comments=["\n\nchain evil {", "\u202e", "\x00", "\r\n}\n", "\t#", *HOSTILE])
@settings(max_examples=8, deadline=None)
def test_comments_with_control_characters_change_nothing_but_comments(
    comments: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    count = 5 * len(comments)
    hostile = with_raw_comments(synthetic(count, ["x"]), comments)
    assert_only_comments_differ(hostile, count, tmp_path_factory.mktemp("nft"))


# ---- semantics without a kernel -------------------------------------------------------------


def test_no_accept_reaches_a_compartment_address() -> None:
    ws = synthetic(50)
    table = parse(render_ruleset(ws))
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    networked = [c for c in ws.compartments.values() if c.network != NETWORK_NONE]
    assert sorted(table.sets["compartment_addrs"]) == sorted(
        links[c.name].address for c in networked
    )
    assert table.sets["openings"] == []
    # The only way into a compartment chain is the egress map (reached after anti-spoofing),
    # and every compartment chain first passes `admitted`, which drops compartment addresses
    # after accepting only established traffic and the (empty) policy openings.
    for name, rules in table.chains.items():
        assert not any(re.search(r"(jump|goto) c_", rule) for rule in rules), name
    assert table.chains["admitted"] == [
        "ct state established,related accept",
        "ip saddr . ip daddr . meta l4proto . th dport @openings accept",
        "ip daddr @compartment_addrs drop",
    ]
    compartment_chains = {n: r for n, r in table.chains.items() if n.startswith("c_")}
    assert set(compartment_chains) == {chain_name(c.name) for c in networked}
    for rules in compartment_chains.values():
        assert rules[0] == "jump admitted"
    # Outside the compartment chains, nothing accepts a new connection from a compartment.
    for name in ("forward", "from_compartment", "to_compartment", "input"):
        for rule in table.chains[name]:
            if rule.endswith("accept"):
                assert "ct state established,related" in rule, rule
    assert table.hooks == {
        "forward": "type filter hook forward priority filter; policy accept;",
        "input": "type filter hook input priority filter; policy accept;",
        "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
    }
    assert table.chains["postrouting"] == ['iifname "qx*" oifname != "qx*" masquerade']


def test_anti_spoofing_pairs_each_interface_with_its_address_only() -> None:
    ws = synthetic(50)
    table = parse(render_ruleset(ws))
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    expected = sorted(
        f'"{names.host_ifname(c.name)}" . {links[c.name].address} : jump {chain_name(c.name)}'
        for c in ws.compartments.values()
        if c.network != NETWORK_NONE
    )
    assert sorted(table.maps["egress"]) == expected
    assert table.chains["from_compartment"][2:] == ["iifname . ip saddr vmap @egress", "drop"]
    net_clients = sorted(
        f'"{names.host_ifname(c.network)}" . {links[c.name].address}'
        for c in ws.compartments.values()
        if c.network not in (NETWORK_NONE, "uplink")
    )
    assert sorted(table.sets["net_clients"]) == net_clients


def test_offline_compartment_appears_nowhere() -> None:
    ws = synthetic(50)
    text = render_ruleset(ws)
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    offline = [c.name for c in ws.compartments.values() if c.network == NETWORK_NONE]
    assert len(offline) == 10
    for name in offline:
        assert names.host_ifname(name) not in text
        assert re.search(rf"\b{re.escape(links[name].address)}\b", text) is None
        assert f'"{name}"' not in text


def test_clients_of_a_net_compartment_leave_only_through_it() -> None:
    ws = load(SMB_OFFICE).workstation
    table = parse(render_ruleset(ws))
    for compartment in ws.compartments.values():
        if compartment.network == NETWORK_NONE:
            continue
        guard = table.chains[chain_name(compartment.name)][1]
        if compartment.network == "uplink":
            assert guard == 'oifname "qx*" drop'
        else:
            assert guard == f'oifname != "{names.host_ifname(compartment.network)}" drop'


def test_chain_and_set_names_carry_no_spec_text() -> None:
    ws = load(SMB_OFFICE).workstation
    table = parse(render_ruleset(ws))
    for name in [*table.chains, *table.sets, *table.maps]:
        assert re.fullmatch(
            r"forward|input|postrouting|from_compartment|to_compartment|admitted|egress|openings"
            r"|compartment_addrs|net_clients|[cd]_qx[0-9a-f]{10}(_h[0-9]+_[46])?",
            name,
        ), name


# ---- live: load it into throwaway namespaces and try ----------------------------------------


UPSTREAM, UPSTREAM_GATEWAY = "192.0.2.1", "192.0.2.0"
RELAY_MASQUERADE = """\
table ip nat {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "eth0" masquerade
\t}
}
"""


@dataclass
class Lab:
    prefix: str
    ws: Workstation
    links: dict[str, names.Link]

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def probe(self, role: str, *targets: tuple[str, str, int]) -> list[str]:
        netns_python = [need("ip"), "netns", "exec", self.ns(role), sys.executable]
        result = run([*netns_python, "-c", PROBE, json.dumps(targets)], timeout=30)
        answers: list[str] = json.loads(result.stdout)
        return answers

    def router_nft(self, *args: str) -> str:
        return run([need("ip"), "netns", "exec", self.ns("router"), need("nft"), *args]).stdout


def live_workstation() -> Workstation:
    return Workstation.model_validate(
        {
            "host": {"hostname": "lab"},
            "compartments": {
                "alpha": {
                    "network": "uplink",
                    "firewall": [{"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [8080]}],
                },
                "beta": {
                    "network": "uplink",
                    "firewall": [{"proto": "udp", "host": UPSTREAM, "ports": [9]}],
                },
                "relay": {
                    "network": "uplink",
                    "provides_network": True,
                    "firewall": [{"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [8080, 8081]}],
                },
                "client": {
                    "network": "relay",
                    "firewall": [{"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [8080]}],
                },
                "vault": {},
            },
        }
    )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    ip, nft, sysctl = need("ip"), need("nft"), need("sysctl")
    ws = live_workstation()
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    lab = Lab(f"qnixtest-{os.getpid()}", ws, links)
    roles = ["router", "upstream", "alpha", "beta", "relay", "client"]
    created: list[str] = []
    servers: list[subprocess.Popen[str]] = []

    def sysctls(role: str, *assignments: str) -> None:
        for assignment in assignments:
            run([ip, "netns", "exec", lab.ns(role), sysctl, "-q", "-w", assignment])

    try:
        for role in roles:
            run([ip, "netns", "add", lab.ns(role)])
            created.append(lab.ns(role))
            run([ip, "-n", lab.ns(role), "link", "set", "lo", "up"])
        forwarding = (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        )
        sysctls("router", *forwarding)
        sysctls("relay", *forwarding)
        router = lab.ns("router")

        def wire(role: str, router_if: str, router_addr: str, addr: str) -> None:
            peer = ["peer", "name", "eth0", "netns", lab.ns(role)]
            run([ip, "-n", router, "link", "add", router_if, "type", "veth", *peer])
            run([ip, "-n", router, "addr", "add", f"{router_addr}/31", "dev", router_if])
            run([ip, "-n", router, "link", "set", router_if, "up"])
            run([ip, "-n", lab.ns(role), "addr", "add", f"{addr}/31", "dev", "eth0"])
            run([ip, "-n", lab.ns(role), "link", "set", "eth0", "up"])
            run([ip, "-n", lab.ns(role), "route", "add", "default", "via", router_addr])

        wire("upstream", "up0", UPSTREAM_GATEWAY, UPSTREAM)
        run([ip, "-n", router, "route", "add", "default", "via", UPSTREAM])
        for role in ("alpha", "beta", "relay", "client"):
            link = links[role]
            wire(role, names.host_ifname(role), link.gateway, link.address)
        # The host routes a client of a net compartment into that net compartment.
        run([ip, "-n", router, "rule", "add", "iif", names.host_ifname("client"), "table", "100"])
        via_relay = ["via", links["relay"].address, "dev", names.host_ifname("relay")]
        run([ip, "-n", router, "route", "add", "default", *via_relay, "table", "100"])
        run([ip, "netns", "exec", lab.ns("relay"), nft, "-f", "-"], input=RELAY_MASQUERADE)

        ruleset = tmp_path / "qnix.nft"
        ruleset.write_text(render_ruleset(ws))
        run([ip, "netns", "exec", router, nft, "-f", str(ruleset)])

        for role, ports in (
            ("upstream", "8080 8081 9090"),
            ("router", "8080"),
            ("beta", "8080"),
            ("relay", "8080"),
        ):
            server = subprocess.Popen(
                [ip, "netns", "exec", lab.ns(role), sys.executable, "-c", SERVE, *ports.split()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            servers.append(server)
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
        yield lab
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)
        for namespace in reversed(created):
            run([ip, "netns", "delete", namespace], check=False)


def test_live_segmentation_in_namespaces(lab: Lab) -> None:
    links = lab.links
    alpha, beta = links["alpha"].address, links["beta"].address
    relay, client = links["relay"].address, links["client"].address

    # A kernel loads the same table the tests above parse.
    listed = lab.router_nft("-j", "list", "ruleset")
    kernel_rules = sum(1 for item in json.loads(listed)["nftables"] if "rule" in item)
    assert kernel_rules == parse(render_ruleset(lab.ws)).rules

    # Controls: every listener answers someone.
    assert lab.probe("beta", ("", "127.0.0.1", 8080)) == ["ok 127.0.0.1"]
    assert lab.probe("relay", ("", "127.0.0.1", 8080)) == ["ok 127.0.0.1"]
    assert lab.probe("upstream", ("", UPSTREAM_GATEWAY, 8080), ("", beta, 8080)) == [
        f"ok {UPSTREAM}",
        "timeout",  # nothing from outside opens a connection into a compartment
    ]

    # alpha may reach anything on tcp/8080 except other compartments and the host itself; what
    # leaves the host is masqueraded, so upstream sees the host's address, never a link's.
    assert lab.probe(
        "alpha",
        ("", UPSTREAM, 8080),
        ("", UPSTREAM, 8081),
        ("", beta, 8080),
        ("", links["alpha"].gateway, 8080),
        ("", UPSTREAM_GATEWAY, 8080),
    ) == [f"ok {UPSTREAM_GATEWAY}", "timeout", "timeout", "timeout", "timeout"]

    # alpha takes beta's address as a second one: whatever it sends with it is dropped.
    spoof = [need("ip"), "-n", lab.ns("alpha"), "addr"]
    run([*spoof, "add", f"{beta}/32", "dev", "eth0"])
    assert lab.probe("alpha", (beta, UPSTREAM, 8080), (alpha, UPSTREAM, 8080)) == [
        "timeout",
        f"ok {UPSTREAM_GATEWAY}",
    ]
    run([*spoof, "del", f"{beta}/32", "dev", "eth0"])

    # client leaves through relay, masqueraded, and only where its own list allows; its
    # tcp/8080-anywhere reaches neither relay's own services nor another compartment.
    assert lab.probe(
        "client",
        ("", UPSTREAM, 8080),
        ("", UPSTREAM, 8081),
        ("", relay, 8080),
        ("", beta, 8080),
    ) == [f"ok {UPSTREAM_GATEWAY}", "timeout", "timeout", "timeout"]
    assert lab.probe("relay", ("", UPSTREAM, 8081), ("", UPSTREAM, 9090), ("", client, 8080)) == [
        f"ok {UPSTREAM_GATEWAY}",
        "timeout",
        "timeout",
    ]

    # Should the host's routing ever send client past its net compartment, it gets nowhere.
    client_if = names.host_ifname("client")
    run([need("ip"), "-n", lab.ns("router"), "rule", "del", "iif", client_if, "table", "100"])
    assert lab.probe("client", ("", UPSTREAM, 8080)) == ["timeout"]

    # An opening from the policy is what lets alpha reach beta.
    lab.router_nft(
        "add", "element", "inet", "qnix", "openings", f"{{ {alpha} . {beta} . tcp . 8080 }}"
    )
    assert lab.probe("alpha", ("", beta, 8080), ("", UPSTREAM, 8081)) == [
        f"ok {alpha}",
        "timeout",
    ]
