"""The workstation's network segmentation as one nftables table, `inet qnix`.

The same text goes to NixOS (`networking.nftables.tables.qnix.content` gets
`render_table_body`) and to a live host (`nft -f` of `render_ruleset`, one transaction).

Topology. Every compartment with a network has a veth pair whose host end is
`names.host_ifname(name)` (`qx` + 10 hex digits) and a /31 from `names.allocate_links`: the host
side is `Link.gateway`, the compartment side `Link.address`. A compartment with
`network = "none"` has no veth: it appears in no set, map or chain of this table, so nothing here
can let it out. A compartment behind a net compartment (`network = "<net>"`) is routed by the
host into the net compartment's veth; the net compartment masquerades it and sends it back to
the host under its own address, where the net compartment's own allow-list applies.

How a packet from a compartment is judged (hook forward):

1. `ct state invalid` is dropped.
2. Replies that a net compartment carries back to one of its own clients are accepted
   (`iifname . ip daddr @net_clients`, reply direction, established or related only): after it
   undoes its masquerade they carry the far end's address, not the net compartment's.
3. Anti-spoofing and dispatch in one lookup: `iifname . ip saddr vmap @egress` maps each
   compartment's (interface, address) pair to `jump c_<ifname>`. Any other source address on a
   qnix interface finds no element and is dropped. IPv6 from a compartment is dropped here too:
   the links are IPv4 only.
4. The compartment's chain first jumps to `admitted`: established and related traffic is
   accepted; then the `openings` set (source, destination, protocol, port), compiled from the
   policy's `qnix.Net` lines (qnix.compile.openings), accepts what the policy opens; then any
   destination in `compartment_addrs` is dropped. So no allow rule below can reach another
   compartment, whatever it says.
5. A guard pins the way out: an uplink compartment may not leave through any qnix interface,
   a compartment behind a net compartment only through that net compartment's interface.
6. One rule per allowed destination and family, from the firewall allow-list, in spec order.
   Whatever falls through returns to the forward chain and is dropped.

What leaves the host by an interface other than a qnix one is masqueraded (hook postrouting):
the upstream network never sees a compartment's link address. Traffic towards a qnix interface
from elsewhere is accepted only as a reply; the input hook
drops everything arriving on a qnix interface, so a compartment cannot reach the host's own
addresses (its gateway, loopback-bound services, the host's LAN address). The host talks to its
compartments through agent sockets, never over these links. Other interfaces of the host pass
this table untouched: every rule matches the `qx*` interface names only, which also covers
interfaces made at run time (disposables) before their elements are added.

Disposables. Each disposable template with a network has an egress chain of its own,
`d_<hashed template name>`, built like a compartment's (jump admitted, the way-out guard, the
allow-list). A disposable made from it at run time changes no rule: the runtime adds its
elements (`disposable_elements`: its interface and address in `egress`, jumping to the
template's chain; its address in `compartment_addrs`; in `net_clients` behind a net
compartment) and deletes them when the disposable ends.

DNS names in a firewall rule are not resolved here: compiling is pure, and handing names to `nft`
would make it resolve them. Each host-name rule gets two empty named sets,
`c_<ifname>_h<index>_4` (`ipv4_addr`) and `..._6` (`ipv6_addr`), listed by `hostname_sets`, that
the runtime fills with the resolved addresses; the rule matches `ip daddr @..._4` (and `ip6 daddr
@..._6`). Until they are filled the rule allows nothing.

Size. O(1) base rules, plus per compartment (and disposable template) with a network a
constant two rules and the rules of its allow-list (one per family it names), and per
compartment one `egress` element and one `compartment_addrs` element (and one `net_clients`
element if it sits behind a net compartment). Nothing is pairwise, so the table grows linearly
with the number of compartments; only the `openings` set holds one element per (source,
target, port) the policy opens, which is as many as its `qnix.Net` lines ask for.

No spec text reaches the output except through `quote` (comments): chain and set names come from
the hashed interface name, addresses and ports are re-rendered from their parsed values.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from qnix.compile import names
from qnix.compile.openings import Opening
from qnix.spec.model import (
    NETWORK_NONE,
    NETWORK_UPLINK,
    Compartment,
    CompartmentBase,
    FirewallRule,
    Workstation,
)

TABLE = "inet qnix"
# Every host end of a qnix veth is `names.host_ifname(...)`, which starts with this prefix.
QNIX_INTERFACES = f'"{names.IFNAME_PREFIX}*"'

# nft strings are double-quoted with no escape mechanism; comments are capped at 128 bytes.
MAX_COMMENT_BYTES = 128
_COMMENT_SAFE = frozenset(string.ascii_letters + string.digits + " -_.,:/+=()@!?%'&")

DNS_PORT = 53

Family = Literal[4, 6]


def quote(text: str) -> str:
    """Spec text as an nft quoted string: characters outside a small printable ASCII set
    become `_`, so no quote, backslash, newline, brace, `;` or `#` can end the string or start
    a new statement; cut to nft's comment limit."""
    safe = "".join(ch if ch in _COMMENT_SAFE else "_" for ch in text)
    return '"' + safe[:MAX_COMMENT_BYTES] + '"'


@dataclass(frozen=True, slots=True)
class HostnameSet:
    """An empty named set the runtime fills with the addresses `hostname` resolves to."""

    set_name: str
    family: Family
    hostname: str
    compartment: str


def chain_name(compartment: str) -> str:
    """The egress chain of a compartment, derived from its hashed interface name."""
    return "c_" + names.host_ifname(compartment)


def template_chain_name(template: str) -> str:
    """The egress chain every disposable made from `template` jumps to."""
    return "d_" + names.host_ifname(template)


def _hostname_set_name(chain: str, index: int, family: Family) -> str:
    return f"{chain}_h{index}_{family}"


def _is_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def hostname_sets(ws: Workstation) -> tuple[HostnameSet, ...]:
    """Every named set a host-name firewall rule refers to, in output order: those of the
    compartments, then those of the disposable templates (`compartment` names the template)."""
    found: list[HostnameSet] = []
    for chain, name, unit in _egress_chains(ws):
        for index, rule in enumerate(unit.firewall):
            if rule.host is not None and _is_hostname(rule.host):
                for family in (4, 6):
                    found.append(
                        HostnameSet(
                            _hostname_set_name(chain, index, family), family, rule.host, name
                        )
                    )
    return tuple(found)


# ---- rendering helpers ----------------------------------------------------------------------


def _set_literal(items: Sequence[str]) -> str:
    """One value bare, several as an anonymous set."""
    if len(items) == 1:
        return items[0]
    return "{ " + ", ".join(items) + " }"


def _ports(ports: Iterable[str]) -> list[str]:
    """Port ranges sorted, with overlapping and adjacent ranges merged."""
    spans: list[tuple[int, int]] = []
    for text in ports:
        first, _, last = text.partition("-")
        spans.append((int(first), int(last or first)))
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return [str(low) if low == high else f"{low}-{high}" for low, high in merged]


def _daddr(family: Family) -> str:
    return "ip daddr" if family == 4 else "ip6 daddr"


def _proto_match(rule: FirewallRule, family: Family) -> str:
    if rule.proto is None:
        return ""
    if rule.proto == "icmp":
        return " meta l4proto " + ("icmp" if family == 4 else "ipv6-icmp")
    if rule.ports:
        return f" {rule.proto} dport {_set_literal(_ports(rule.ports))}"
    return f" meta l4proto {rule.proto}"


def _comment(text: str) -> str:
    return f" comment {quote(text)}" if text else ""


def _dns_rules(rule: FirewallRule, dns_servers: Sequence[str]) -> list[str]:
    proto = f"meta l4proto {{ tcp, udp }} th dport {DNS_PORT}"
    comment = _comment(rule.comment)
    if not dns_servers:
        return [f"{proto} accept{comment}"]
    addresses = sorted({ipaddress.ip_address(a) for a in dns_servers}, key=_address_key)
    lines = []
    for family in (4, 6):
        chosen = [str(a) for a in addresses if a.version == family]
        if chosen:
            lines.append(f"{_daddr(family)} {_set_literal(chosen)} {proto} accept{comment}")
    return lines


def _address_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    return (address.version, int(address))


def _allow_rules(
    chain: str, index: int, rule: FirewallRule, dns_servers: Sequence[str]
) -> list[str]:
    """The nft rules of one firewall rule: one per address family it names."""
    if rule.dns:
        return _dns_rules(rule, dns_servers)
    comment = _comment(rule.comment)
    destinations: list[tuple[Family, str]]
    if rule.cidr is not None:
        network = ipaddress.ip_network(rule.cidr)
        destinations = [(4 if network.version == 4 else 6, str(network))]
    elif rule.host is not None and not _is_hostname(rule.host):
        address = ipaddress.ip_address(rule.host)
        destinations = [(4 if address.version == 4 else 6, str(address))]
    elif rule.host is not None:
        destinations = [
            (family, "@" + _hostname_set_name(chain, index, family)) for family in (4, 6)
        ]
    else:  # the model rejects a rule without host, cidr or dns
        raise ValueError(f"firewall rule {index} of chain {chain} has no destination")
    return [
        f"{_daddr(family)} {target}{_proto_match(rule, family)} accept{comment}"
        for family, target in destinations
    ]


def _networked(ws: Workstation) -> list[Compartment]:
    return [c for c in ws.compartments.values() if c.network != NETWORK_NONE]


def _egress_chains(ws: Workstation) -> list[tuple[str, str, CompartmentBase]]:
    """(chain, name, compartment or template) for every egress chain, in output order."""
    chains: list[tuple[str, str, CompartmentBase]] = [
        (chain_name(c.name), c.name, c) for c in _networked(ws)
    ]
    chains += [
        (template_chain_name(name), name, template)
        for name, template in ws.disposable_templates.items()
        if template.network != NETWORK_NONE
    ]
    return chains


def _net_of(ws: Workstation, name: str, unit: CompartmentBase) -> Compartment | None:
    """The net compartment a compartment (or template) sits behind, or None for uplink."""
    if unit.network == NETWORK_UPLINK:
        return None
    net = ws.compartments.get(unit.network)
    if net is None or not net.provides_network:
        # qnix.compile.inputs.check_references reports this to the user; here it is a caller's bug.
        raise ValueError(
            f"compartment {name!r} uses network {unit.network!r}, which is not a net compartment"
        )
    return net


def _guard(ws: Workstation, name: str, unit: CompartmentBase) -> str:
    net = _net_of(ws, name, unit)
    if net is None:
        return f"oifname {QNIX_INTERFACES} drop"
    return f'oifname != "{names.host_ifname(net.name)}" drop'


def _block(header: str, lines: Iterable[str]) -> str:
    body = "".join(f"\t\t{line}\n" for line in lines)
    return f"\t{header} {{\n{body}\t}}\n"


def _elements(items: Sequence[str]) -> list[str]:
    if not items:
        return []
    inner = ",\n".join(f"\t\t\t{item}" for item in items)
    return ["elements = {\n" + inner + "\n\t\t}"]


# ---- the table ------------------------------------------------------------------------------


def opening_elements(ws: Workstation, openings: Sequence[Opening]) -> list[str]:
    """The `openings` set's elements: source address . target address . protocol . port, in
    the order given. Both ends must be compartments of `ws` with a network."""
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    found = []
    for opening in openings:
        for end in (opening.source, opening.target):
            compartment = ws.compartments.get(end)
            if compartment is None or compartment.network == NETWORK_NONE:
                raise ValueError(f"opening names {end!r}, which is no compartment with a network")
        if opening.proto not in ("tcp", "udp") or not 1 <= opening.port <= 65535:
            raise ValueError(f"not an opening: {opening.proto} port {opening.port}")
        source, target = links[opening.source].address, links[opening.target].address
        found.append(f"{source} . {target} . {opening.proto} . {opening.port:d}")
    return found


def render_table_body(ws: Workstation, openings: Sequence[Opening] = ()) -> str:
    """The lines inside `table inet qnix { ... }`; `openings` fill the `openings` set."""
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    networked = _networked(ws)

    addresses = [links[c.name].address for c in networked]
    egress = [
        f'"{names.host_ifname(c.name)}" . {links[c.name].address} : jump {chain_name(c.name)}'
        for c in networked
    ]
    net_clients = []
    for compartment in networked:
        net = _net_of(ws, compartment.name, compartment)
        if net is not None:
            net_clients.append(
                f'"{names.host_ifname(net.name)}" . {links[compartment.name].address}'
            )

    blocks = [
        _block("set compartment_addrs", ["type ipv4_addr", *_elements(addresses)]),
        _block("set net_clients", ["type ifname . ipv4_addr", *_elements(net_clients)]),
        # From the policy (qnix.Net): who may open what on whom.
        _block(
            "set openings",
            [
                "type ipv4_addr . ipv4_addr . inet_proto . inet_service",
                *_elements(opening_elements(ws, openings)),
            ],
        ),
        _block("map egress", ["type ifname . ipv4_addr : verdict", *_elements(egress)]),
    ]
    for hostname_set in hostname_sets(ws):
        kind = "ipv4_addr" if hostname_set.family == 4 else "ipv6_addr"
        blocks.append(_block(f"set {hostname_set.set_name}", [f"type {kind}", "flags interval"]))

    blocks += [
        _block(
            "chain forward",
            [
                "type filter hook forward priority filter; policy accept;",
                f"iifname {QNIX_INTERFACES} jump from_compartment",
                f"oifname {QNIX_INTERFACES} jump to_compartment",
            ],
        ),
        _block(
            "chain input",
            [
                "type filter hook input priority filter; policy accept;",
                f"iifname {QNIX_INTERFACES} drop",
            ],
        ),
        # Compartment traffic that leaves the host (not towards another qnix interface) goes
        # out under the host's address: the compartments' link addresses are private.
        _block(
            "chain postrouting",
            [
                "type nat hook postrouting priority srcnat; policy accept;",
                f"iifname {QNIX_INTERFACES} oifname != {QNIX_INTERFACES} masquerade",
            ],
        ),
        _block(
            "chain from_compartment",
            [
                "ct state invalid drop",
                "iifname . ip daddr @net_clients ct direction reply"
                " ct state established,related accept",
                "iifname . ip saddr vmap @egress",
                "drop",
            ],
        ),
        _block("chain to_compartment", ["ct state established,related accept", "drop"]),
        _block(
            "chain admitted",
            [
                "ct state established,related accept",
                "ip saddr . ip daddr . meta l4proto . th dport @openings accept",
                "ip daddr @compartment_addrs drop",
            ],
        ),
    ]
    for chain, name, unit in _egress_chains(ws):
        rules = [f"comment {quote(name)}", "jump admitted", _guard(ws, name, unit)]
        for index, rule in enumerate(unit.firewall):
            rules += _allow_rules(chain, index, rule, ws.host.dns_servers)
        blocks.append(_block(f"chain {chain}", rules))
    return "\n".join(blocks)


def disposable_elements(
    ws: Workstation, template: str, host_ifname: str, address: str
) -> dict[str, str]:
    """The elements that admit one running disposable made from `template`, with host end
    `host_ifname` and link address `address`: {set or map name: element}. The runtime adds
    them when the disposable starts and deletes them when it ends; the rules never change."""
    unit = ws.disposable_templates[template]
    if unit.network == NETWORK_NONE:
        return {}
    ipaddress.IPv4Address(address)  # only a parsed address reaches the output
    if not re.fullmatch(rf"{names.IFNAME_PREFIX}[0-9a-f]{{10}}", host_ifname):
        raise ValueError(f"not a qnix interface name: {host_ifname!r}")
    found = {
        "compartment_addrs": address,
        "egress": f'"{host_ifname}" . {address} : jump {template_chain_name(template)}',
    }
    net = _net_of(ws, template, unit)
    if net is not None:
        found["net_clients"] = f'"{names.host_ifname(net.name)}" . {address}'
    return found


def render_ruleset(ws: Workstation, openings: Sequence[Opening] = ()) -> str:
    """A complete file for `nft -f`."""
    return f"table {TABLE} {{\n" + render_table_body(ws, openings) + "}\n"
