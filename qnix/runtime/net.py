"""Network namespaces, veth pairs, routes and the nft table on a live host.

Every compartment runs in a network namespace of its own, named `<prefix><compartment>` and kept
under /run/netns like any `ip netns` namespace, so an admin can inspect it by hand. A compartment
with a network gets a veth pair: the host end `names.host_ifname(name)` with the link's gateway
address, the compartment end `eth0` with its address and a default route via the gateway. A
compartment behind a net compartment is routed by the host into that net compartment (`ip rule
iif <its host end> table N`, table N holding one default route via the net compartment's
address); the net compartment forwards and masquerades it back to the host under its own
address, where its own allow-list applies. See qnix.compile.nft for the filter.

Links, addresses, routes and rules go through routing netlink in-process (qnix.runtime.netlink,
pyroute2), the tables through libnftables in-process (qnix.runtime.nft), kernel parameters
through /proc/sys inside the namespace: no process per step, and `qnix --debug` still shows
each step as one line (`netlink: qnix-work: add veth qx1a2b <-> qnix-work:eth0`, each nft
transaction's exact text). Each `ensure_*` first looks at what exists, changes only what
differs and says whether it changed anything: idempotent, and the caller can report "no
changes". `ip` stays for the read-only `ip -j` listings drift compares, and for `resolve`.

`host_netns` names the namespace that plays the host (None: the one qnix runs in). Tests give
one they made, so they never touch the real host's links, routes or ruleset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qnix.compile.names import IFNAME_PREFIX, Link
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime import netlink, nft

log = logging.getLogger("qnix.net")

NETNS_DIR = Path("/run/netns")
COMPARTMENT_IFNAME = "eth0"
# Routing tables for the clients of a net compartment: base + the net compartment's link slot.
ROUTE_TABLE_BASE = 20000
RULE_PRIORITY = 20000
TABLE = "inet qnix"
# What libnftables says of a table that is not there (ENOENT's words).
NO_SUCH_TABLE = "Error: No such file or directory"
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


def preload() -> None:
    """Load what the network steps use (pyroute2's modules, libnftables) now, not at the first
    step: a resident process that forks (the spawner) pays for it once, not in every fork."""
    netlink.pyroute2()
    nft.load()


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

    def _path(self, netns: str | None) -> Path | None:
        """Where a namespace named `netns` is bound (None: the one qnix runs in)."""
        return None if netns is None else self.netns_dir / netns

    @staticmethod
    def _label(netns: str | None) -> str:
        return netns or "host"

    def _rtnl(self, netns: str | None) -> netlink.Rtnl:
        return netlink.Rtnl(self._label(netns), self._path(netns))

    # ---- running ip (read-only listings for drift and tests) ---------------------------------

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
        changed = self.bind_netns(compartment)
        with self._rtnl(self.netns(compartment)) as inside:
            changed |= self._ensure_loopback(inside)
        return changed

    def bind_netns(self, compartment: str) -> bool:
        """The compartment's namespace, nothing in it up yet: `ensure_link` brings its
        loopback up with its link (a disposable's, in a thread beside its sandbox's start)."""
        name, path = self.netns(compartment), self.netns_path(compartment)
        if path.exists() and not netlink.is_netns(path):
            netlink.remove_netns(path, name)  # a file a kill left before it was bound
        if path.exists():
            return False
        netlink.create_netns(path, name)
        return True

    @staticmethod
    def _ensure_loopback(inside: netlink.Rtnl) -> bool:
        lo = inside.link("lo")
        if lo is None:
            raise QnixError(f"network namespace {inside.label} has no loopback interface")
        if lo.up:
            return False
        inside.set_up(lo)
        return True

    def remove_netns(self, compartment: str) -> bool:
        """Delete the namespace and its links, so the host end of its veth pair too. The links
        go first, explicitly: the kernel ends an unbound namespace (and what it holds) later,
        in the background, and not at all while a process is still inside."""
        name, path = self.netns(compartment), self.netns_path(compartment)
        if not path.exists():
            return False
        if netlink.is_netns(path):
            with self._rtnl(name) as inside:
                for link in inside.links():
                    if link != "lo":
                        inside.delete_link(link)
        netlink.remove_netns(path, name)
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

    @staticmethod
    def _ensure_address(rtnl: netlink.Rtnl, link: netlink.LinkState, address: str) -> bool:
        """Exactly `address`/31 as the interface's IPv4 address."""
        changed = False
        present = set(rtnl.addresses(link))
        wanted = f"{address}/31"
        for stale in sorted(present - {wanted}):
            rtnl.delete_address(link, stale)
            changed = True
        if wanted not in present:
            rtnl.add_address(link, wanted)
            changed = True
        return changed

    @staticmethod
    def _ensure_up(rtnl: netlink.Rtnl, link: netlink.LinkState) -> bool:
        if link.up:
            return False
        rtnl.set_up(link)
        return True

    @staticmethod
    def _ensure_default_route(
        rtnl: netlink.Rtnl, gateway: str, link: netlink.LinkState, table: int = netlink.MAIN_TABLE
    ) -> bool:
        if rtnl.default_routes(table) == [(gateway, link.index)]:
            return False
        rtnl.replace_default_route(gateway, link, table)
        return True

    @staticmethod
    def _wanted_rules(ifname: str, net: NetRoute | None) -> set[netlink.Rule]:
        """For a client of a net compartment: `iif <ifname> lookup <table>`, and before it
        `iif <ifname> to <subnet> lookup main`, so that what is meant for another compartment
        (which only an opening of the policy admits) goes there directly rather than through
        the net compartment. Nothing for any other compartment."""
        if net is None:
            return set()
        subnet = str(ipaddress.IPv4Network(net.subnet))
        return {
            netlink.Rule(RULE_PRIORITY - 1, ifname, subnet, netlink.MAIN_TABLE),
            netlink.Rule(RULE_PRIORITY, ifname, None, net.table),
        }

    def _ensure_rules(self, host: netlink.Rtnl, ifname: str, net: NetRoute | None) -> bool:
        changed = False
        wanted = self._wanted_rules(ifname, net)
        found: set[netlink.Rule] = set()
        for rule in host.rules():
            if rule.iifname != ifname:
                continue
            if rule in wanted and rule not in found:  # keep one of each, drop duplicates, others
                found.add(rule)
                continue
            changed |= host.delete_rule(rule)
        if net is not None:
            router = host.link(net.host_ifname)
            if router is None:
                raise QnixError(
                    f"the net compartment's link {net.host_ifname} is missing",
                    hint="its compartment's link is made first; `qnix apply` makes both",
                )
            changed |= self._ensure_default_route(host, net.gateway, router, net.table)
        for rule in sorted(wanted - found):
            host.add_rule(rule)
            changed = True
        return changed

    def ensure_link(self, compartment: str, uplink: Uplink) -> bool:
        """The veth pair, its addresses and default route; for a client of a net compartment
        also the rule and table that send its traffic there. The net compartment's own link
        must exist first."""
        inside_name = self.netns(compartment)
        changed = False
        with self._rtnl(self.host_netns) as host, self._rtnl(inside_name) as inside:
            host_end = host.link(uplink.host_ifname)
            inner_end = inside.link(COMPARTMENT_IFNAME)
            if host_end is not None and inner_end is None:
                # The host end's peer is elsewhere (a namespace made anew): pair them again.
                host.delete_link(uplink.host_ifname)
                host_end = None
            if host_end is None:
                if inner_end is not None:
                    inside.delete_link(COMPARTMENT_IFNAME)
                path = self.netns_path(compartment)
                host.add_veth(uplink.host_ifname, COMPARTMENT_IFNAME, path, inside_name)
                changed = True
                host_end = host.link(uplink.host_ifname)
                inner_end = inside.link(COMPARTMENT_IFNAME)
            if host_end is None or inner_end is None:
                raise QnixError(f"the veth pair {uplink.host_ifname} vanished as it was made")
            changed |= self._ensure_address(host, host_end, uplink.link.gateway)
            changed |= self._ensure_up(host, host_end)
            changed |= self._ensure_address(inside, inner_end, uplink.link.address)
            changed |= self._ensure_up(inside, inner_end)
            changed |= self._ensure_loopback(inside)
            changed |= self._ensure_default_route(inside, uplink.link.gateway, inner_end)
            changed |= self._ensure_rules(host, uplink.host_ifname, uplink.net)
        return changed

    def remove_link(self, host_ifname: str) -> bool:
        """The veth pair and the rules that name its host end (its routes go with it)."""
        changed = False
        with self._rtnl(self.host_netns) as host:
            for rule in host.rules():
                if rule.iifname == host_ifname:
                    changed |= host.delete_rule(rule)
            if host.link(host_ifname) is not None:
                changed |= host.delete_link(host_ifname)
        return changed

    def list_links(self) -> list[str]:
        """Host-side qnix interfaces that exist."""
        with self._rtnl(self.host_netns) as host:
            return sorted(n for n in host.links() if n.startswith(IFNAME_PREFIX))

    def list_rule_interfaces(self) -> list[str]:
        """qnix interfaces named by a routing rule (whether or not the interface exists)."""
        with self._rtnl(self.host_netns) as host:
            rules = host.rules()
        return sorted({r.iifname for r in rules if r.iifname.startswith(IFNAME_PREFIX)})

    # ---- forwarding and net compartments -------------------------------------------------

    def sysctl(self, netns: str | None, key: str) -> str:
        """A kernel parameter of a namespace, read from /proc/sys while inside it."""
        with netlink.entered(self._path(netns), self._label(netns)):
            try:
                return _sysctl_file(key).read_text().strip()
            except OSError as exc:
                raise QnixError(
                    f"sysctl: {self._label(netns)}: cannot read {key}: {exc.strerror}"
                ) from exc

    def set_sysctl(self, netns: str | None, key: str, value: str) -> bool:
        """Set a kernel parameter in a namespace; False if it already had that value.
        Through /proc/sys: netlink sets some per interface, not ip_forward or the `all` ones."""
        if self.sysctl(netns, key) == value:
            return False
        label = self._label(netns)
        log.debug("sysctl: %s: %s = %s", label, key, value)
        with netlink.entered(self._path(netns), label):
            try:
                _sysctl_file(key).write_text(value + "\n")
            except OSError as exc:
                raise QnixError(
                    f"sysctl: {label}: cannot set {key} to {value}: {exc.strerror}"
                ) from exc
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

    def nft(self, netns: str | None, commands: str, *, terse: bool = False) -> str:
        """nft commands in a namespace, as one transaction (libnftables, in-process)."""
        return nft.run(self._path(netns), self._label(netns), commands, terse=terse)

    def _replace_table(
        self, netns: str | None, table: str, ruleset: str, comment: str | None = None
    ) -> None:
        # Declaring the table first makes the delete valid when there is none yet; the whole
        # text is one transaction, so the old table stays if anything fails. The kernel keeps
        # a table's comment from its first declaration only, so it comes first.
        declared = "" if comment is None else f'table {table} {{ comment "{comment}"; }}\n'
        self.nft(netns, f"table {table}\ndelete table {table}\n{declared}{ruleset}")

    def load_table(self, ruleset: str, *, comment: str | None = None) -> None:
        """Replace the `inet qnix` table in one transaction: all of `ruleset` or nothing.

        `ruleset` may go on after the table with statements such as `add element`; they are
        part of the same transaction. `comment` (nft quoting: no `"`, at most 128 characters)
        becomes the table's own comment."""
        self._replace_table(self.host_netns, TABLE, ruleset, comment)

    def nft_listing(self, netns: str | None, table: str, *, terse: bool = False) -> str | None:
        """`nft list table` of a table in a namespace, or None if there is no such table;
        `terse` leaves out the elements of its sets and maps."""
        try:
            return self.nft(netns, f"list table {table}", terse=terse)
        except QnixError as exc:
            if NO_SUCH_TABLE in exc.message:
                return None
            raise

    def add_elements(self, elements: Sequence[tuple[str, str]]) -> None:
        """Add elements to sets and maps of the table, in one transaction."""
        if elements:
            self.nft(self.host_netns, element_statements(elements))

    def delete_elements(self, elements: Sequence[tuple[str, str]]) -> None:
        """Delete elements, those already gone (or with their table) being no error.

        One transaction adds each element and deletes it again: the add makes the delete
        valid whether or not the element is still there (nft 1.0.6 has no `destroy`), so it
        ends with all of them gone, or, if the table or a set is gone or an element now holds
        another value, changes nothing; then each is deleted on its own."""
        deletes = [
            f"delete element {TABLE} {name} {{ {element.split(' : ', 1)[0]} }}\n"
            for name, element in elements  # a map's element goes by its key
        ]
        path, label = self._path(self.host_netns), self._label(self.host_netns)
        adds = element_statements(elements).splitlines(keepends=True)
        together = "".join(add + delete for add, delete in zip(adds, deletes, strict=True))
        if not deletes or nft.try_run(path, label, together):
            return
        for delete in deletes:
            nft.try_run(path, label, delete)

    def table_listing(self) -> str | None:
        return self.nft_listing(self.host_netns, TABLE)

    def has_table(self) -> bool:
        return self.table_listing() is not None

    def table_comment(self) -> str | None:
        """The `inet qnix` table's own comment (None: no table, or no comment)."""
        return table_comment(self.nft_listing(self.host_netns, TABLE, terse=True) or "")

    def delete_table(self) -> bool:
        if self.nft_listing(self.host_netns, TABLE, terse=True) is None:
            return False
        self.nft(self.host_netns, f"delete table {TABLE}")
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


def _sysctl_file(key: str) -> Path:
    return Path("/proc/sys", key.replace(".", "/"))
