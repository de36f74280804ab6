"""`qnix drift`: where the live host differs from the live generation `qnix apply` installed.

What is compared, each a list of `Difference(kind, subject, expected, actual)`:

* `generation`: every file of the live generation against the SHA-256 in its manifest.json
  (changed, missing, or not listed), and the manifest's own generation name.
* `nft-*`: the `inet qnix` table as loaded against the table apply would load for the live
  generation: its ruleset (with the policy's openings), the host-name sets filled with the
  addresses apply resolved and recorded, and the elements of the running disposables. Both are
  listings by the same `nft`: the expected one comes from loading that transaction into a
  throwaway network namespace (`unshare --net`, gone with the process), so the comparison is of
  nft's own normal form, never of our text against its. Chains are compared rule by rule, in
  order; sets and maps by their declaration and then element by element, whatever the order.
  A net compartment's masquerade table (`ip qnix_net`, inside it) is compared the same way.
* `netns`, `link`, `address`, `route`, `rule`: each compartment's namespace (loopback up), its
  veth pair (both ends up, exactly the /31 addresses of its link), its default route, for a
  client of a net compartment the host's routing rules and table into it; and anything
  qnix-named that belongs to nothing live: namespaces with the prefix, `qx*` links, rules.
* `sysctl`: what apply and the runtime set: IPv4 forwarding on the host; in a net compartment
  forwarding and no ICMP redirects, and loose reverse-path filtering on its host end.
* `compartment`: autostart compartments that do not run, and runs whose keeper is dead.

A difference's `expected` is None for something that should not be there, `actual` None for
something missing. Reading is all drift does (it takes the lock only to see a host no apply is
halfway through); `qnix apply` puts back what it reports. Without a live generation the
expected host holds nothing of qnix, so any table, namespace or link left is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from qnix.audit import events
from qnix.compile import names
from qnix.compile.artifacts import MANIFEST
from qnix.compile.nft import TABLE
from qnix.compile.overlay import NEBULA_DEV
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime.backends import vm
from qnix.runtime.live import (
    live_workstation,
    locked,
    network_for,
    network_order,
    read_json,
    run_names,
    running_disposables,
    uplink_of,
)
from qnix.runtime.net import (
    COMPARTMENT_IFNAME,
    RULE_PRIORITY,
    HostNetwork,
    require_root,
    route_table,
)
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.status import statuses
from qnix.runtime.wanted import (
    PRESENT,
    Difference,
    expected_transaction,
    net_table_differences,
    table_differences,
)
from qnix.spec.model import NETWORK_NONE, Workstation

HOST_PLACE = "host"


# ---- the generation's files ----------------------------------------------------------------


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def generation_differences(folder: Path, applied_generation: str | None) -> list[Difference]:
    """Files of the generation in `folder` against its manifest."""
    if not folder.is_dir():
        return []
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        listed = manifest["files"]
        name = str(manifest["generation"])
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [Difference("generation", MANIFEST, "a manifest of the generation", f"{exc}")]
    found: list[Difference] = []
    wanted: dict[str, str] = {}
    for relative, digest in sorted(listed.items()):
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts or not parts:
            found.append(Difference("generation", MANIFEST, None, f"a file outside: {relative}"))
            continue
        wanted[relative] = str(digest)
        actual = _sha256_of(folder / relative)
        if actual != digest:
            found.append(Difference("generation", relative, str(digest), actual))
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}
    for extra in sorted(on_disk - set(wanted) - {MANIFEST}):
        found.append(Difference("generation", extra, None, _sha256_of(folder / extra)))
    recomputed = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    if recomputed != name:
        found.append(Difference("generation", f"{MANIFEST} generation", name, recomputed))
    if applied_generation is not None and applied_generation != name:
        found.append(Difference("generation", "applied generation", applied_generation, name))
    return found


# ---- nft listings --------------------------------------------------------------------------


# ---- namespaces, links, addresses, routes, rules -------------------------------------------


def _interfaces(net: HostNetwork, netns: str | None) -> dict[str, dict[str, Any]]:
    """Interfaces with their flags and addresses (`ip -j addr show`)."""
    return {str(i["ifname"]): i for i in net.ip_json(netns, "addr", "show", check=False)}


def _ipv4(interface: dict[str, Any]) -> list[str]:
    return sorted(
        f"{info['local']}/{info['prefixlen']}"
        for info in interface.get("addr_info", [])
        if info.get("family") == "inet"
    )


def _is_up(interface: dict[str, Any]) -> bool:
    return "UP" in interface.get("flags", [])


def _default_routes(net: HostNetwork, netns: str | None, table: int | None = None) -> str | None:
    where = ["table", str(table)] if table is not None else []
    routes = net.ip_json(netns, "-4", "route", "show", "default", *where, check=False)
    shown = [f"via {r.get('gateway', '-')} dev {r.get('dev', '-')}" for r in routes]
    return "; ".join(shown) or None


def _rule_text(priority: int, destination: str | None, table: str) -> str:
    return f"priority {priority}{f' to {destination}' if destination else ''} table {table}"


def _host_rules(net: HostNetwork) -> dict[str, list[str]]:
    """The host's routing rules by the qnix interface they name."""
    found: dict[str, list[str]] = {}
    for rule in net.ip_json(net.host_netns, "-4", "rule", "show"):
        interface = str(rule.get("iif", ""))
        if not interface.startswith(names.IFNAME_PREFIX):
            continue
        destination = f"{rule['dst']}/{rule['dstlen']}" if "dst" in rule else None
        text = _rule_text(int(rule.get("priority", 0)), destination, str(rule.get("table")))
        found.setdefault(interface, []).append(text)
    return found


def _link_differences(
    net: HostNetwork,
    ws: Workstation,
    name: str,
    host_interfaces: dict[str, dict[str, Any]],
    host_rules: dict[str, list[str]],
) -> Iterator[Difference]:
    compartment = ws.compartments[name]
    netns = net.netns(name)
    inside = _interfaces(net, netns)
    loopback = inside.get("lo")
    if loopback is None or not _is_up(loopback):
        yield Difference("link", f"{netns}:lo", "up", "down" if loopback else None)
    allowed = {"lo"} | ({COMPARTMENT_IFNAME} if compartment.network != NETWORK_NONE else set())
    if compartment.isolation == vm.ISOLATION and compartment.network != NETWORK_NONE:
        allowed.add(vm.TAP_IFNAME)  # a running VM's, joined to the veth's inner end
    if compartment.overlay is not None and ws.overlay is not None:
        allowed.add(NEBULA_DEV)  # its overlay's, while its keeper runs nebula
    for stray in sorted(inside.keys() - allowed):
        yield Difference("link", f"{netns}:{stray}", None, PRESENT)
    if compartment.network == NETWORK_NONE:
        return
    uplink = uplink_of(ws, compartment)
    assert uplink is not None  # a compartment with a network has one
    host_end, inner_end = uplink.host_ifname, f"{netns}:{COMPARTMENT_IFNAME}"
    pair = f"veth {host_end} <-> {inner_end}"
    has_host, has_inner = host_end in host_interfaces, COMPARTMENT_IFNAME in inside
    if not (has_host and has_inner):
        actual = (
            None if not (has_host or has_inner) else f"only {host_end if has_host else inner_end}"
        )
        yield Difference("link", host_end, pair, actual)
    else:
        ends = (
            (host_end, host_interfaces[host_end], uplink.link.gateway),
            (inner_end, inside[COMPARTMENT_IFNAME], uplink.link.address),
        )
        for label, interface, address in ends:
            if not _is_up(interface):
                yield Difference("link", label, "up", "down")
            if _ipv4(interface) != [f"{address}/31"]:
                yield Difference(
                    "address", label, f"{address}/31", ", ".join(_ipv4(interface)) or None
                )
        wanted_route = f"via {uplink.link.gateway} dev {COMPARTMENT_IFNAME}"
        actual_route = _default_routes(net, netns)
        if actual_route != wanted_route:
            yield Difference("route", f"{netns} default", wanted_route, actual_route)
    wanted_rules: list[str] = []
    if uplink.net is not None:
        wanted_rules = sorted(
            [
                _rule_text(RULE_PRIORITY - 1, uplink.net.subnet, "main"),
                _rule_text(RULE_PRIORITY, None, str(uplink.net.table)),
            ]
        )
    actual_rules = sorted(host_rules.get(host_end, []))
    if actual_rules != wanted_rules:
        yield Difference(
            "rule", host_end, "; ".join(wanted_rules) or None, "; ".join(actual_rules) or None
        )


def network_differences(
    paths: RuntimePaths, net: HostNetwork, ws: Workstation | None
) -> list[Difference]:
    found: list[Difference] = []
    compartments = ws.compartments if ws is not None else {}
    disposables = running_disposables(paths)
    present = set(net.list_netns())
    for name in sorted(compartments.keys() - present):
        found.append(Difference("netns", net.netns(name), PRESENT, None))
    for name in sorted(present - compartments.keys() - disposables.keys()):
        found.append(Difference("netns", net.netns(name), None, PRESENT))

    host_interfaces = _interfaces(net, net.host_netns)
    host_rules = _host_rules(net)
    wanted_links = {c.host_ifname for c in disposables.values() if c.host_ifname is not None}
    if ws is not None:
        for compartment in network_order(ws):
            if compartment.network != NETWORK_NONE:
                wanted_links.add(names.host_ifname(compartment.name))
            if compartment.name in present:
                found += _link_differences(net, ws, compartment.name, host_interfaces, host_rules)
        links = names.allocate_links(ws.compartments, ws.host.subnet)
        for net_compartment in ws.net_compartments():
            clients = [c for c in ws.compartments.values() if c.network == net_compartment.name]
            if net_compartment.network == NETWORK_NONE or not clients:
                continue
            table = route_table(links[net_compartment.name], ws.host.subnet)
            router = links[net_compartment.name].address
            wanted = f"via {router} dev {names.host_ifname(net_compartment.name)}"
            actual = _default_routes(net, net.host_netns, table)
            if actual != wanted:
                found.append(Difference("route", f"table {table} default", wanted, actual))
    for link in sorted(set(net.list_links()) - wanted_links):
        found.append(Difference("link", link, None, PRESENT))
    for interface in sorted(host_rules.keys() - wanted_links):
        found.append(Difference("rule", interface, None, "; ".join(host_rules[interface])))
    return found


# ---- net compartments' own tables and the kernel parameters ---------------------------------


@dataclass(frozen=True, slots=True)
class WantedSysctl:
    place: str  # "host" or the compartment's name
    netns: str | None
    key: str
    value: str


def wanted_sysctls(paths: RuntimePaths, net: HostNetwork, ws: Workstation) -> list[WantedSysctl]:
    """The kernel parameters apply sets, where their namespace and interface exist."""
    wanted = [WantedSysctl(HOST_PLACE, paths.host_netns, "net.ipv4.ip_forward", "1")]
    present = set(net.list_netns())
    host_links = set(net.list_links())
    for compartment in ws.net_compartments():
        name = compartment.name
        if name not in present or compartment.network == NETWORK_NONE:
            continue
        inside = net.netns(name)
        wanted.append(WantedSysctl(name, inside, "net.ipv4.ip_forward", "1"))
        for scope in ("all", COMPARTMENT_IFNAME):
            key = f"net.ipv4.conf.{scope}.send_redirects"
            wanted.append(WantedSysctl(name, inside, key, "0"))
        host_end = names.host_ifname(name)
        if host_end in host_links:
            key = f"net.ipv4.conf.{host_end}.rp_filter"
            wanted.append(WantedSysctl(HOST_PLACE, paths.host_netns, key, "2"))
    return wanted


def read_sysctls(net: HostNetwork, netns: str | None, keys: Sequence[str]) -> dict[str, str]:
    """Several kernel parameters of one namespace in one `sysctl` run; a missing key is left
    out of the answer."""
    sysctl = require_tool("sysctl", "procps")
    if netns is None:
        output = run([sysctl, *keys], check=False).stdout
    else:
        output = net.ip(None, "netns", "exec", netns, sysctl, *keys, check=False)
    values = {}
    for line in output.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            values[key.strip()] = value.strip()
    return values


def sysctl_differences(wanted: Iterable[WantedSysctl], net: HostNetwork) -> list[Difference]:
    by_netns: dict[str | None, list[WantedSysctl]] = {}
    for item in wanted:
        by_netns.setdefault(item.netns, []).append(item)
    found = []
    for netns, items in by_netns.items():
        values = read_sysctls(net, netns, [item.key for item in items])
        for item in items:
            actual = values.get(item.key)
            if actual != item.value:
                found.append(Difference("sysctl", f"{item.place} {item.key}", item.value, actual))
    return found


# ---- compartments ---------------------------------------------------------------------------


def compartment_differences(paths: RuntimePaths, ws: Workstation | None) -> list[Difference]:
    found = []
    known = set()
    if ws is not None:
        for status in statuses(paths):
            known.add(status.name)
            compartment = ws.compartments.get(status.name)
            if compartment is None:
                continue  # a running disposable
            should_run = compartment.autostart
            wanted = "running" if should_run else "stopped"
            if status.state == "crashed" or (should_run and status.state != "running"):
                actual = (
                    "crashed (its keeper is gone)" if status.state == "crashed" else status.state
                )
                found.append(Difference("compartment", status.name, wanted, actual))
    for name in run_names(paths):
        if name not in known:
            found.append(Difference("compartment", name, None, "a run folder without a keeper"))
    return found


# ---- all of it -----------------------------------------------------------------------------


def _live(paths: RuntimePaths) -> tuple[Workstation | None, list[Difference]]:
    try:
        return live_workstation(paths), []
    except (ValidationError, ValueError, OSError) as exc:
        problem = f"unreadable: {str(exc).splitlines()[0]}"
        return None, [Difference("generation", "spec.json", "the live generation's spec", problem)]


def drift(paths: RuntimePaths) -> list[Difference]:
    """Every difference between this host and its live generation; recorded in the audit log
    (event `drift`, with their count)."""
    require_root()
    net = network_for(paths)
    lock = locked(paths) if paths.run_root.is_dir() else contextlib.nullcontext()
    with lock:
        ws, found = _live(paths)
        applied = read_json(paths.applied_file)
        recorded = applied.get("generation")
        found += generation_differences(
            paths.generation_dir, str(recorded) if recorded is not None else None
        )
        if ws is None:
            found += table_differences(net, None)
        else:
            wanted = expected_transaction(paths, ws)
            try:
                found += table_differences(net, wanted) if wanted is not None else []
            except QnixError as exc:  # nft refuses what the generation holds
                refused = f"a table nft refuses: {exc.message.splitlines()[-1]}"
                found.append(Difference("nft-table", TABLE, refused, PRESENT))
            found += net_table_differences(net, ws)
            found += sysctl_differences(wanted_sysctls(paths, net, ws), net)
        found += network_differences(paths, net, ws)
        found += compartment_differences(paths, ws)
    events.record(paths, "drift", count=len(found))
    return found
