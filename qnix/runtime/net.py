"""Network namespaces, veth pairs, routes and the nft table on a live host.

Every compartment runs in a network namespace of its own, named `<prefix><compartment>` and kept
under /run/netns like any `ip netns` namespace, so an admin can inspect it by hand. A compartment
with a network gets a veth pair: the host end `names.host_ifname(name)` with the link's gateway
address, the compartment end `eth0` with its address and a default route via the gateway. A
compartment behind a net compartment is routed by the host into that net compartment (`ip rule
iif <its host end> table N`, table N holding one default route via the net compartment's
address); the net compartment forwards and masquerades it back to the host under its own
address, where its own allow-list applies. See qnix.compile.nft for the filter.

Everything goes through `ip`, `nft` and `sysctl` run by qnix.runtime.runner, so `qnix --debug`
shows each change as a command an admin could type. Each `ensure_*` first looks at what exists
(`ip -j`), changes only what differs and says whether it changed anything: idempotent, and the
caller can report "no changes".

`host_netns` names the namespace that plays the host (None: the one qnix runs in). Tests give
one they made, so they never touch the real host's links, routes or ruleset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qnix.compile.names import IFNAME_PREFIX, Link
from qnix.errors import QnixError
from qnix.runtime.runner import require_tool, run

NETNS_DIR = Path("/run/netns")
COMPARTMENT_IFNAME = "eth0"
# Routing tables for the clients of a net compartment: base + the net compartment's link slot.
ROUTE_TABLE_BASE = 20000
RULE_PRIORITY = 20000
TABLE = "inet qnix"
# The masquerade a net compartment applies to its clients' traffic, inside its own namespace.
NET_COMPARTMENT_TABLE = "ip qnix_net"
NET_COMPARTMENT_RULESET = f"""\
table {NET_COMPARTMENT_TABLE} {{
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "{COMPARTMENT_IFNAME}" masquerade
\t}}
}}
"""

Family = Literal[4, 6]


@dataclass(frozen=True, slots=True)
class NetRoute:
    """Where a client of a net compartment is sent: table `table` on the host holds a default
    route via the net compartment's own address on its host end; addresses in `subnet` (other
    compartments) stay on the main table."""

    table: int
    gateway: str
    host_ifname: str
    subnet: str  # the compartments' network: not sent through the net compartment


@dataclass(frozen=True, slots=True)
class Uplink:
    """A compartment's veth pair and, behind a net compartment, the route into it."""

    host_ifname: str
    link: Link
    net: NetRoute | None = None


def route_table(net_link: Link, subnet: str) -> int:
    """The routing table of a net compartment's clients: unique per net compartment."""
    network = ipaddress.IPv4Network(subnet)
    slot = (int(ipaddress.IPv4Address(net_link.gateway)) - int(network.network_address)) // 2
    return ROUTE_TABLE_BASE + slot


class HostNetwork:
    """The network side of the runtime, relative to one host namespace."""

    def __init__(
        self, *, prefix: str = "qnix-", host_netns: str | None = None, netns_dir: Path = NETNS_DIR
    ) -> None:
        self.prefix = prefix
        self.host_netns = host_netns
        self.netns_dir = netns_dir
        self._ip_path: str | None = None

    def netns(self, compartment: str) -> str:
        return f"{self.prefix}{compartment}"

    def netns_path(self, compartment: str) -> Path:
        return self.netns_dir / self.netns(compartment)

    # ---- running ip --------------------------------------------------------------------------

    @property
    def _ip_tool(self) -> str:
        if self._ip_path is None:
            self._ip_path = require_tool("ip", "iproute2")
        return self._ip_path

    def ip(self, netns: str | None, *args: str, check: bool = True) -> str:
        prefix = [self._ip_tool] + (["-n", netns] if netns else [])
        return run([*prefix, *args], check=check).stdout

    def ip_json(self, netns: str | None, *args: str, check: bool = True) -> list[dict[str, Any]]:
        """`ip -j` output; with check=False a failing command (e.g. listing a routing table
        that does not exist yet) reads as an empty list."""
        prefix = [self._ip_tool] + (["-n", netns] if netns else [])
        result = run([*prefix, "-j", *args], check=check)
        if result.returncode != 0:
            return []
        parsed = json.loads(result.stdout) if result.stdout.strip() else []
        if not isinstance(parsed, list):
            raise QnixError(f"unexpected output of ip -j {' '.join(args)}: {result.stdout[:200]}")
        return [item for item in parsed if isinstance(item, dict)]

    # ---- namespaces ----------------------------------------------------------------------

    def ensure_netns(self, compartment: str) -> bool:
        """The compartment's namespace with loopback up (all a `network = "none"` one has)."""
        name = self.netns(compartment)
        changed = False
        if not self.netns_path(compartment).exists():
            self.ip(None, "netns", "add", name)
            changed = True
        lo = self.ip_json(name, "link", "show", "dev", "lo")
        if not lo or "UP" not in lo[0].get("flags", []):
            self.ip(name, "link", "set", "lo", "up")
            changed = True
        return changed

    def remove_netns(self, compartment: str) -> bool:
        """Delete the namespace (and with it its end of the veth pair, so the host end too)."""
        if not self.netns_path(compartment).exists():
            return False
        self.ip(None, "netns", "delete", self.netns(compartment))
        return True

    def list_netns(self) -> list[str]:
        """Compartment names whose namespace exists (under this prefix)."""
        try:
            entries = os.listdir(self.netns_dir)
        except FileNotFoundError:
            return []
        return sorted(
            entry[len(self.prefix) :]
            for entry in entries
            if entry.startswith(self.prefix) and entry != self.host_netns and entry != self.prefix
        )

    # ---- links ---------------------------------------------------------------------------

    def _links(self, netns: str | None) -> dict[str, dict[str, Any]]:
        return {str(link["ifname"]): link for link in self.ip_json(netns, "link", "show")}

    def _ensure_addresses(self, netns: str | None, ifname: str, address: str) -> bool:
        """Exactly `address`/31 as the interface's IPv4 address."""
        changed = False
        found = self.ip_json(netns, "-4", "addr", "show", "dev", ifname)
        present = {
            f"{info['local']}/{info['prefixlen']}"
            for entry in found
            for info in entry.get("addr_info", [])
            if info.get("family") == "inet"
        }
        wanted = f"{address}/31"
        for stale in sorted(present - {wanted}):
            self.ip(netns, "addr", "del", stale, "dev", ifname)
            changed = True
        if wanted not in present:
            self.ip(netns, "addr", "add", wanted, "dev", ifname)
            changed = True
        return changed

    def _ensure_up(self, netns: str | None, link: dict[str, Any]) -> bool:
        if "UP" in link.get("flags", []):
            return False
        self.ip(netns, "link", "set", str(link["ifname"]), "up")
        return True

    def _ensure_default_route(
        self, netns: str | None, gateway: str, dev: str, table: int | None = None
    ) -> bool:
        where = ["table", str(table)] if table is not None else []
        routes = self.ip_json(netns, "-4", "route", "show", "default", *where, check=False)
        if any(r.get("gateway") == gateway and r.get("dev") == dev for r in routes) and (
            len(routes) == 1
        ):
            return False
        self.ip(netns, "route", "replace", "default", "via", gateway, "dev", dev, *where)
        return True

    def _rules_of(self, ifname: str) -> list[dict[str, Any]]:
        return [
            r for r in self.ip_json(self.host_netns, "-4", "rule", "show") if r.get("iif") == ifname
        ]

    @staticmethod
    def _rule_args(priority: int, ifname: str, destination: str | None, table: str) -> list[str]:
        to = [] if destination is None else ["to", destination]
        return ["priority", str(priority), "iif", ifname, *to, "table", table]

    @staticmethod
    def _rule_key(rule: dict[str, Any]) -> tuple[int, str | None, str]:
        destination = f"{rule['dst']}/{rule['dstlen']}" if "dst" in rule else None
        return int(rule["priority"]), destination, str(rule["table"])

    def _del_rule(self, rule: dict[str, Any]) -> None:
        priority, destination, table = self._rule_key(rule)
        args = self._rule_args(priority, str(rule["iif"]), destination, table)
        self.ip(self.host_netns, "-4", "rule", "del", *args)

    def _ensure_rule(self, ifname: str, net: NetRoute | None) -> bool:
        """For a client of a net compartment: `iif <ifname> lookup <table>`, and before it
        `iif <ifname> to <subnet> lookup main`, so that what is meant for another compartment
        (which only an opening of the policy admits) goes there directly rather than through
        the net compartment. Nothing for any other compartment."""
        changed = False
        wanted: set[tuple[int, str | None, str]] = set()
        if net is not None:
            wanted = {
                (RULE_PRIORITY - 1, net.subnet, "main"),
                (RULE_PRIORITY, None, str(net.table)),
            }
        found: set[tuple[int, str | None, str]] = set()
        for rule in self._rules_of(ifname):
            key = self._rule_key(rule)
            if key in wanted and key not in found:  # keep one of each, drop duplicates, others
                found.add(key)
                continue
            self._del_rule(rule)
            changed = True
        if net is not None:
            changed |= self._ensure_default_route(
                self.host_netns, net.gateway, net.host_ifname, net.table
            )
        for priority, destination, table in sorted(wanted - found, key=lambda key: key[0]):
            args = self._rule_args(priority, ifname, destination, table)
            self.ip(self.host_netns, "-4", "rule", "add", *args)
            changed = True
        return changed

    def ensure_link(self, compartment: str, uplink: Uplink) -> bool:
        """The veth pair, its addresses and default route; for a client of a net compartment
        also the rule and table that send its traffic there. The net compartment's own link
        must exist first."""
        inside = self.netns(compartment)
        changed = False
        host_links = self._links(self.host_netns)
        if uplink.host_ifname not in host_links:
            if COMPARTMENT_IFNAME in self._links(inside):
                self.ip(inside, "link", "del", COMPARTMENT_IFNAME)
            self.ip(
                self.host_netns,
                "link",
                "add",
                uplink.host_ifname,
                "type",
                "veth",
                "peer",
                "name",
                COMPARTMENT_IFNAME,
                "netns",
                inside,
            )
            changed = True
            host_links = self._links(self.host_netns)
        changed |= self._ensure_addresses(self.host_netns, uplink.host_ifname, uplink.link.gateway)
        changed |= self._ensure_up(self.host_netns, host_links[uplink.host_ifname])
        changed |= self._ensure_addresses(inside, COMPARTMENT_IFNAME, uplink.link.address)
        changed |= self._ensure_up(inside, self._links(inside)[COMPARTMENT_IFNAME])
        changed |= self._ensure_default_route(inside, uplink.link.gateway, COMPARTMENT_IFNAME)
        changed |= self._ensure_rule(uplink.host_ifname, uplink.net)
        return changed

    def remove_link(self, host_ifname: str) -> bool:
        """The veth pair and the rules that name its host end (its routes go with it)."""
        changed = False
        for rule in self._rules_of(host_ifname):
            self._del_rule(rule)
            changed = True
        if host_ifname in self._links(self.host_netns):
            self.ip(self.host_netns, "link", "del", host_ifname)
            changed = True
        return changed

    def list_links(self) -> list[str]:
        """Host-side qnix interfaces that exist."""
        return sorted(n for n in self._links(self.host_netns) if n.startswith(IFNAME_PREFIX))

    def list_rule_interfaces(self) -> list[str]:
        """qnix interfaces named by a routing rule (whether or not the interface exists)."""
        rules = self.ip_json(self.host_netns, "-4", "rule", "show")
        return sorted(
            {str(r["iif"]) for r in rules if str(r.get("iif", "")).startswith(IFNAME_PREFIX)}
        )

    # ---- forwarding and net compartments -------------------------------------------------

    def sysctl(self, netns: str | None, key: str) -> str:
        if netns is None:
            return Path("/proc/sys", key.replace(".", "/")).read_text().strip()
        sysctl = require_tool("sysctl", "procps")
        return self.ip(None, "netns", "exec", netns, sysctl, "-n", key).strip()

    def set_sysctl(self, netns: str | None, key: str, value: str) -> bool:
        """Set a kernel parameter in a namespace; False if it already had that value."""
        if self.sysctl(netns, key) == value:
            return False
        sysctl = require_tool("sysctl", "procps")
        command = [sysctl, "-q", "-w", f"{key}={value}"]
        if netns is None:
            run(command)
        else:
            self.ip(None, "netns", "exec", netns, *command)
        return True

    def enable_forwarding(self, netns: str | None) -> bool:
        """IPv4 forwarding in a namespace (the host, or a net compartment)."""
        return self.set_sysctl(netns, "net.ipv4.ip_forward", "1")

    def ensure_net_compartment(self, compartment: str, host_ifname: str) -> bool:
        """What makes a compartment a router for others: forwarding and a masquerade inside
        it, no ICMP redirects (its clients' traffic leaves by the interface it came in on), and
        loose reverse-path filtering on its host end, where replies for its clients arrive."""
        inside = self.netns(compartment)
        changed = self.enable_forwarding(inside)
        for scope in ("all", COMPARTMENT_IFNAME):
            changed |= self.set_sysctl(inside, f"net.ipv4.conf.{scope}.send_redirects", "0")
        changed |= self.set_sysctl(self.host_netns, f"net.ipv4.conf.{host_ifname}.rp_filter", "2")
        if self.nft_listing(inside, NET_COMPARTMENT_TABLE) is None:
            self._replace_table(inside, NET_COMPARTMENT_TABLE, NET_COMPARTMENT_RULESET)
            changed = True
        return changed

    def replace_net_compartment_table(self, compartment: str) -> None:
        """Load the masquerade table into a net compartment again, in one transaction."""
        self._replace_table(self.netns(compartment), NET_COMPARTMENT_TABLE, NET_COMPARTMENT_RULESET)

    # ---- nftables ------------------------------------------------------------------------

    def nft(self, netns: str | None, args: list[str], *, input: str | None = None) -> str:
        nft = require_tool("nft", "nftables")
        prefix = [] if netns is None else [self._ip_tool, "netns", "exec", netns]
        return run([*prefix, nft, *args], input=input).stdout

    def _replace_table(
        self, netns: str | None, table: str, ruleset: str, comment: str | None = None
    ) -> None:
        # Declaring the table first makes the delete valid when there is none yet; nft -f runs
        # the whole file as one transaction, so the old table stays if anything fails. The
        # kernel keeps a table's comment from its first declaration only, so it comes first.
        declared = "" if comment is None else f'table {table} {{ comment "{comment}"; }}\n'
        statements = f"table {table}\ndelete table {table}\n{declared}{ruleset}"
        self.nft(netns, ["-f", "-"], input=statements)

    def load_table(self, ruleset: str, *, comment: str | None = None) -> None:
        """Replace the `inet qnix` table in one transaction: all of `ruleset` or nothing.

        `ruleset` may go on after the table with statements such as `add element`; they are
        part of the same transaction. `comment` (nft quoting: no `"`, at most 128 characters)
        becomes the table's own comment."""
        self._replace_table(self.host_netns, TABLE, ruleset, comment)

    def nft_listing(self, netns: str | None, table: str, *, terse: bool = False) -> str | None:
        """`nft list table` of a table in a namespace, or None if there is no such table;
        `terse` leaves out the elements of its sets and maps."""
        tables = self.nft(netns, ["list", "tables"]).splitlines()
        if f"table {table}" not in tables:
            return None
        return self.nft(netns, [*(["-t"] if terse else []), "list", "table", *table.split()])

    def add_elements(self, elements: Sequence[tuple[str, str]]) -> None:
        """Add elements to sets and maps of the table, in one transaction."""
        if elements:
            self.nft(self.host_netns, ["-f", "-"], input=element_statements(elements))

    def delete_elements(self, elements: Sequence[tuple[str, str]]) -> None:
        """Delete elements, each on its own: one already gone (or no table) is no error."""
        nft = require_tool("nft", "nftables")
        prefix = (
            [] if self.host_netns is None else [self._ip_tool, "netns", "exec", self.host_netns]
        )
        for name, element in elements:
            key = element.split(" : ", 1)[0]  # a map's element goes by its key
            statement = f"delete element {TABLE} {name} {{ {key} }}\n"
            run([*prefix, nft, "-f", "-"], input=statement, check=False)

    def table_listing(self) -> str | None:
        return self.nft_listing(self.host_netns, TABLE)

    def has_table(self) -> bool:
        return self.table_listing() is not None

    def table_comment(self) -> str | None:
        """The `inet qnix` table's own comment (None: no table, or no comment)."""
        return table_comment(self.nft_listing(self.host_netns, TABLE, terse=True) or "")

    def delete_table(self) -> bool:
        if not self.has_table():
            return False
        self.nft(self.host_netns, ["delete", "table", *TABLE.split()])
        return True

    # ---- names ---------------------------------------------------------------------------

    def resolve(
        self, queries: Sequence[tuple[str, Family]]
    ) -> dict[tuple[str, Family], tuple[str, ...]]:
        """The addresses each (host name, family) has, looked up from the host namespace by
        the C library (so /etc/hosts and the host's resolver both count), all in one process;
        () for a name that does not resolve."""
        if not queries:
            return {}
        command = [sys.executable, "-I", "-S", "-c", _RESOLVER, json.dumps(list(queries))]
        if self.host_netns is not None:
            command = [self._ip_tool, "netns", "exec", self.host_netns, *command]
        answers = json.loads(run(command, timeout=120).stdout)
        if not isinstance(answers, list) or len(answers) != len(queries):
            raise QnixError("the name resolver gave a malformed answer")
        resolved: dict[tuple[str, Family], tuple[str, ...]] = {}
        for (hostname, family), found in zip(queries, answers, strict=True):
            addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
            for text in found if isinstance(found, list) else ():
                with contextlib.suppress(ValueError, TypeError):
                    address = ipaddress.ip_address(text)
                    if address.version == family:
                        addresses.add(address)
            resolved[(hostname, family)] = tuple(str(a) for a in sorted(addresses, key=int))
        return resolved


# getaddrinfo without AI_ADDRCONFIG (which `getent ahosts` sets): a host namespace with only
# loopback must still resolve from /etc/hosts.
_RESOLVER = """\
import json, socket, sys
answers = []
for name, family in json.loads(sys.argv[1]):
    kind = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        found = socket.getaddrinfo(name, None, kind, socket.SOCK_STREAM)
    except OSError:
        found = []
    answers.append(sorted({info[4][0] for info in found}))
print(json.dumps(answers))
"""


def element_statements(elements: Sequence[tuple[str, str]]) -> str:
    """`add element` statements for an nft file or transaction."""
    return "".join(f"add element {TABLE} {name} {{ {element} }}\n" for name, element in elements)


def table_comment(listing: str) -> str | None:
    """The comment of the table in an `nft list table` listing: nft puts it on the line after
    the table's, one tab in (a chain's or rule's comment is further in)."""
    lines = listing.splitlines()
    match = re.fullmatch(r'\tcomment "([^"]*)"', lines[1]) if len(lines) > 1 else None
    return match.group(1) if match else None


def require_root() -> None:
    if os.geteuid() != 0:
        raise QnixError("qnix must run as root to manage namespaces", hint="run it with sudo")
