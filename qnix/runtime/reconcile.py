"""Bringing the host to a spec (`apply`) or, after a reboot, to the installed generation
(`boot`), and taking qnix off it (`down`, `gc`).

`apply` compiles the spec and makes the host match it, in an order that never leaves a moment
with forwarding on and no filter: the nft table first (one transaction), then forwarding, then
each compartment's namespace and link (a net compartment before its clients), its state
folders, the live generation, the desktop's files (menu entries and the label colours' window
rules, qnix.runtime.desktop), and last the autostart compartments and the preloaded
disposables. Every step looks before it acts (qnix.runtime.wanted), so a second apply changes
nothing and says so. Compartments that left the spec are stopped and their namespace, link
and run folder removed (their state too with `purge`). `apply` also keeps a copy of the
generation under the state root (the installed generation): `boot`, which the boot unit runs,
clears whatever the run root and the host still hold of qnix and brings the host to that copy
through the same steps, so a reboot is a clean start and needs no spec file; given the folder
`qnix build` wrote (on NixOS, the flake's source), it installs that generation first. `down` removes
all of qnix's runtime from the host and keeps the state; `gc` removes what a crash left behind.

`apply`, `boot`, `down` and `gc` first make sure the host's network is not another qnix instance's
(qnix.runtime.hostowner); `apply` marks the table it loads as this one's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Set
from pathlib import Path

from qnix.audit import events
from qnix.compile import names, openings
from qnix.compile.artifacts import RULESET, SPEC_COPY, Artifacts, compile_spec
from qnix.compile.nft import TABLE, hostname_sets
from qnix.errors import QnixError
from qnix.runtime import btrfs, cgroups, desktop, hostowner, spawner, storage
from qnix.runtime.disposables import fill_pools, write_pool_file
from qnix.runtime.files import atomic_write, replace_tree, temporaries_of, tree_leftovers
from qnix.runtime.keeper import teardown_network
from qnix.runtime.lifecycle import cleanup_run, start_locked, stop_locked
from qnix.runtime.live import (
    built_generation,
    ensure_root,
    ensure_state_dirs,
    host_identity,
    installed_generation,
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
    HostNetwork,
    require_root,
    table_comment,
)
from qnix.runtime.paths import RUN_ROOT_ENTRIES, RuntimePaths
from qnix.runtime.quickrun import (
    running_state,
)
from qnix.runtime.state import remember_recipient, remove_leftovers
from qnix.runtime.wanted import (
    disposable_matches,
    disposables_statements,
    holds_exactly,
    net_table_differences,
    table_differences,
    table_shape,
    table_transaction,
)
from qnix.spec.load import LoadedSpec
from qnix.spec.model import NETWORK_NONE, Workstation


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyResult:
    generation: str
    changes: tuple[str, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # of the host, not of the spec (on stderr)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _net_tables_drifted(net: HostNetwork, ws: Workstation) -> list[str]:
    """Net compartments whose masquerade table was changed by hand since it was loaded."""

    return sorted({d.subject.split(":", 1)[0] for d in net_table_differences(net, ws)})


def _table_drifted(net: HostNetwork, wanted: str) -> bool:
    """Whether the loaded table differs from `wanted` in anything, elements included (such as
    an opening deleted by hand), which the shape and hashes above do not see."""

    return bool(table_differences(net, wanted))


def _remove_compartment(paths: RuntimePaths, net: HostNetwork, name: str, purge: bool) -> list[str]:
    changes = []
    if stop_locked(paths, name):
        changes.append(f"{name}: stopped (no longer in the spec)")
    if net.remove_link(names.host_ifname(name)):
        changes.append(f"{name}: removed its link {names.host_ifname(name)}")
    if net.remove_netns(name):
        changes.append(f"{name}: removed its network namespace {net.netns(name)}")
    if purge and paths.state_dir(name).exists():
        btrfs.remove_tree(paths.state_dir(name))
        changes.append(f"{name}: purged its state {paths.state_dir(name)}")
    return changes


def apply(paths: RuntimePaths, loaded: LoadedSpec, *, purge: bool = False) -> ApplyResult:
    """Bring this host to the spec; what changed (nothing on a second run)."""
    require_root()
    ws = loaded.workstation
    artifacts = compile_spec(loaded)
    notes = [f"policy {warning.render()}" for warning in openings.for_spec(loaded).warnings]
    net, warnings = _prepare(paths, ws)
    with locked(paths):
        changes, unresolved = _bring_to(paths, net, ws, artifacts, purge)
    return ApplyResult(
        artifacts.generation, tuple(changes), tuple(notes + unresolved), tuple(warnings)
    )


def boot(paths: RuntimePaths, generation: Path | None = None) -> ApplyResult | None:
    """A clean start from the installed generation, for the boot unit: /run is assumed empty
    and the state root not. Whatever a previous run left (running compartments, namespaces,
    links, the table, disposables, the run root's files, unfinished snapshots) is removed
    first, then the host is brought to the installed generation as `apply` brings it to a
    spec: autostart compartments started with fresh root trees, the pool refilled. One audit
    entry `boot` records it. None: nothing was ever applied (nothing to do).

    `generation`: a folder `qnix build` wrote (on NixOS the flake's own source in the store),
    checked whole before anything is touched and installed in place of the installed
    generation, which the host is then brought to."""
    require_root()
    artifacts = installed_generation(paths) if generation is None else built_generation(generation)
    if artifacts is None:
        return None
    ws = Workstation.model_validate_json(artifacts.files[SPEC_COPY])
    net, warnings = _prepare(paths, ws)
    with locked(paths):
        changes = _install(paths, artifacts)
        changes += _clear(paths, net, read_json(paths.applied_file))
        _remove_run_root_entries(paths, keep={paths.lock_file.name})
        changes += remove_leftovers(paths)  # a snapshot or restore cut off by the power
        try:
            brought, notes = _bring_to(paths, net, ws, artifacts, purge=False)
        except QnixError as exc:
            events.record(
                paths, "boot", generation=artifacts.generation, result=f"error: {exc.message}"
            )
            raise
        changes += brought
        started = sorted(
            name for name in run_names(paths) if running_state(paths, name) is not None
        )
        events.record(paths, "boot", generation=artifacts.generation, running=started, result="ok")
    return ApplyResult(artifacts.generation, tuple(changes), tuple(notes), tuple(warnings))


def _install(paths: RuntimePaths, artifacts: Artifacts) -> list[str]:
    """The generation kept under the state root, what `qnix boot` brings up."""
    if holds_exactly(paths.installed_dir, artifacts.files):
        return []
    replace_tree(paths.installed_dir, artifacts.files)
    return [f"installed generation {artifacts.generation[:16]}"]


def _prepare(paths: RuntimePaths, ws: Workstation) -> tuple[HostNetwork, list[str]]:
    """The host network, once it is sure to be this instance's, and warnings about the host."""
    net = network_for(paths)
    hostowner.require_host_network(paths, net)  # before anything of this instance is made
    ensure_root(paths.state_root)
    warnings = []
    if any(c.persistence != "disposable" for c in ws.compartments.values()):
        at_rest = storage.state_root_warning(paths.state_root)
        warnings += [at_rest] if at_rest else []
    return net, warnings


def _bring_to(
    paths: RuntimePaths, net: HostNetwork, ws: Workstation, artifacts: Artifacts, purge: bool
) -> tuple[list[str], list[str]]:
    """The host brought to `artifacts` (compiled from `ws`): what changed, and notes (host
    names that resolve to nothing). The caller holds the lock."""
    changes: list[str] = []
    notes: list[str] = []
    previous = live_workstation(paths)
    applied = read_json(paths.applied_file)
    applied_before = dict(applied)

    disposables = running_disposables(paths)
    for name, config in sorted(disposables.items()):
        if not disposable_matches(ws, config):
            stop_locked(paths, name)
            teardown_network(config)
            del disposables[name]
            changes.append(f"{name}: stopped (its template {config.template} changed)")
    leftover = set(previous.compartments) if previous else set()
    leftover |= set(net.list_netns()) | set(run_names(paths))
    for name in sorted(leftover - set(ws.compartments) - set(disposables)):
        changes += _remove_compartment(paths, net, name, purge)

    # The filter before anything can forward: one transaction, all or nothing.
    transaction, resolved = table_transaction(ws, artifacts.files[RULESET].decode(), net)
    listing = net.table_listing()
    if (
        listing is None
        or not hostowner.marked_by(paths, table_comment(listing))
        or applied.get("nft_sha256") != _sha256(transaction)
        or applied.get("nft_listing_sha256") != _sha256(table_shape(listing))
        or _table_drifted(net, transaction + disposables_statements(disposables))
    ):
        # Running disposables keep their elements across the reload.
        net.load_table(
            transaction + disposables_statements(disposables),
            comment=hostowner.owner_mark(paths),
        )
        atomic_write(paths.nft_transaction_file, transaction.encode(), 0o600)
        listing = net.table_listing() or ""
        changes.append(f"loaded nft table {TABLE} (generation {artifacts.generation[:16]})")
    named_sets = hostname_sets(ws)
    unresolved = {(n.compartment, n.hostname) for n in named_sets} - {
        (n.compartment, n.hostname) for n in named_sets if resolved[n.set_name]
    }
    for compartment_name, hostname in sorted(unresolved):
        notes.append(
            f"{compartment_name}: {hostname} resolves to nothing; its firewall rule allows "
            "nothing until an apply finds addresses"
        )

    if net.sysctl(paths.host_netns, "net.ipv4.ip_forward") != "1":
        # Recorded before the change, so that `down` turns it off again even if this
        # apply fails further on.
        applied.setdefault("host_ip_forward_before", "0")
        atomic_write(paths.applied_file, (json.dumps(applied, indent=2) + "\n").encode())
        net.enable_forwarding(paths.host_netns)
        changes.append("enabled IPv4 forwarding on the host")

    for compartment in network_order(ws):
        name = compartment.name
        if net.ensure_netns(name):
            changes.append(f"{name}: network namespace {net.netns(name)}")
        uplink = uplink_of(ws, compartment)
        if uplink is None:
            if net.remove_link(names.host_ifname(name)):
                changes.append(f"{name}: removed its link (network is none)")
            continue
        if net.ensure_link(name, uplink):
            via = "" if uplink.net is None else f", routed through {compartment.network}"
            changes.append(
                f"{name}: link {uplink.host_ifname} {uplink.link.gateway} <-> "
                f"{uplink.link.address}/31{via}"
            )
        if compartment.provides_network and net.ensure_net_compartment(name, uplink.host_ifname):
            changes.append(f"{name}: forwards and masquerades for its clients")
    for name in _net_tables_drifted(net, ws):
        net.replace_net_compartment_table(name)
        changes.append(f"{name}: its masquerade table put back as the generation has it")

    for compartment in ws.compartments.values():
        if compartment.persistence == "disposable":
            continue
        identity = host_identity(ws, compartment.name)
        if ensure_state_dirs(paths, compartment.name, identity):
            changes.append(
                f"{compartment.name}: state folder {paths.home(compartment.name)} "
                f"(owner {identity.uid})"
            )

    if not holds_exactly(paths.generation_dir, artifacts.files):
        replace_tree(paths.generation_dir, artifacts.files)
        changes.append(f"live generation {artifacts.generation[:16]}")
    changes += _install(paths, artifacts)
    changes += desktop.sync(paths, ws)
    if remember_recipient(paths):
        changes.append(f"host's age recipient {paths.recipient_file}")
    record = {
        **applied,
        "generation": artifacts.generation,
        "nft_sha256": _sha256(transaction),
        "nft_listing_sha256": _sha256(table_shape(listing)),
        "resolved": resolved,
    }
    if record != applied_before:
        atomic_write(paths.applied_file, (json.dumps(record, indent=2) + "\n").encode())

    for compartment in ws.compartments.values():
        if not compartment.autostart:
            continue
        if start_locked(paths, ws, compartment.name):
            changes.append(f"{compartment.name}: started")
    write_pool_file(paths, ws)
    changes += fill_pools(paths, ws)
    if spawner.ensure_running(paths):
        changes.append("started the spawner (it forks the keepers of new disposables)")
    return changes, notes


def _stray_cgroups(paths: RuntimePaths, keep: set[str]) -> list[str]:
    prefix = paths.netns_prefix
    return [
        name[len(prefix) :]
        for name in cgroups.names()
        if name.startswith(prefix) and name[len(prefix) :] not in keep
    ]


def _clear(paths: RuntimePaths, net: HostNetwork, applied: Mapping[str, object]) -> list[str]:
    """Every compartment stopped, and qnix's spawner, namespaces, links, rules, table,
    forwarding and cgroups removed from the host (`applied`: what apply recorded of it)."""
    changes = []
    if spawner.stop(paths):
        changes.append("stopped the spawner")
    for name in run_names(paths):
        if stop_locked(paths, name):
            changes.append(f"{name}: stopped")
    for name in net.list_netns():
        net.remove_link(names.host_ifname(name))
        net.remove_netns(name)
        changes.append(f"{name}: removed its network namespace {net.netns(name)}")
    for link in net.list_links():
        net.remove_link(link)
        changes.append(f"removed link {link}")
    for interface in net.list_rule_interfaces():
        net.remove_link(interface)
        changes.append(f"removed the routing rule of {interface}")
    if net.delete_table():
        changes.append(f"removed nft table {TABLE}")
    if applied.get("host_ip_forward_before") == "0":
        net.set_sysctl(paths.host_netns, "net.ipv4.ip_forward", "0")
        changes.append("turned IPv4 forwarding on the host off again")
    for name in _stray_cgroups(paths, set()):
        cleanup_run(paths, name)
        changes.append(f"{name}: removed its cgroup")
    return changes


def _remove_run_root_entries(paths: RuntimePaths, keep: Set[str] = frozenset()) -> None:
    """Only what qnix puts there: a run root named by mistake (`--run-root /tmp`) keeps
    everything else."""
    for entry in RUN_ROOT_ENTRIES:
        if entry in keep:
            continue
        path = paths.run_root / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        for left in temporaries_of(path):  # of a write killed just before its rename
            left.unlink(missing_ok=True)
        for tree in tree_leftovers(path):  # of a replace_tree killed halfway
            shutil.rmtree(tree, ignore_errors=True)


def down(paths: RuntimePaths) -> list[str]:
    """Stop every compartment and remove all of qnix's runtime from the host; keep the state."""
    require_root()
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    had_run_root = paths.run_root.exists()
    with locked(paths):
        changes = _clear(paths, net, read_json(paths.applied_file))
        changes += desktop.sync(paths, None)
        _remove_run_root_entries(paths)
        try:  # the run root itself only when nothing else is left in it
            paths.run_root.rmdir()  # (the lock above made it, if it was not there)
            if had_run_root:
                changes.append(f"removed {paths.run_root}")
        except OSError:
            changes.append(f"kept {paths.run_root}: it holds files qnix did not put there")
    return changes


def gc(paths: RuntimePaths) -> list[str]:
    """Remove what a crash left: run folders and cgroups without a keeper, namespaces, links,
    rules and nft elements of compartments neither live nor running, the table without a
    generation; and the table as it was loaded (host names resolved, running disposables'
    elements) when a firewall reload flushed or replaced it. qnix mounts nothing on the host
    (bubblewrap's mounts live and die in the compartment's own mount namespace), so there are
    no mounts to remove."""
    require_root()
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    changes: list[str] = []
    with locked(paths):
        ws = live_workstation(paths)
        live = set(ws.compartments) if ws is not None else set()
        running = {name for name in run_names(paths) if running_state(paths, name) is not None}
        for name in sorted(set(run_names(paths)) - running):
            if cleanup_run(paths, name):
                changes.append(f"{name}: removed what its crashed run left (cgroup, run folder)")
        for name in _stray_cgroups(paths, running):
            if cleanup_run(paths, name):
                changes.append(f"{name}: removed its cgroup")
        for name in sorted(set(net.list_netns()) - live - running):
            net.remove_link(names.host_ifname(name))
            net.remove_netns(name)
            changes.append(f"{name}: removed its network namespace {net.netns(name)}")
        wanted_links = set()
        if ws is not None:
            wanted_links = {
                names.host_ifname(c.name)
                for c in ws.compartments.values()
                if c.network != NETWORK_NONE
            }
        wanted_links |= {names.host_ifname(name) for name in running}
        for link in sorted(set(net.list_links()) - wanted_links):
            net.remove_link(link)
            changes.append(f"removed link {link}")
        existing = set(net.list_links())
        for interface in sorted(set(net.list_rule_interfaces()) - existing):
            net.remove_link(interface)
            changes.append(f"removed the routing rule of {interface}")
        if spawner.remove_leftovers(paths):
            changes.append("removed what a killed spawner left")
        for claim in sorted(paths.pool_root.glob("*/*.sock")):
            if claim.stem not in running:
                claim.unlink(missing_ok=True)
                changes.append(f"removed the claim socket of {claim.stem}")
        changes += remove_leftovers(paths)  # unfinished snapshots and restores
        if ws is None and net.delete_table():
            changes.append(f"removed nft table {TABLE} (no live generation)")
        listing = net.table_listing() if ws is not None else None
        # Elements name interfaces: one that belongs to nothing live is a crashed disposable's.
        stale = set(re.findall(r'"(qx[0-9a-f]{10})" \. ', listing or "")) - wanted_links
        # A table that is gone, or not the one this instance loaded (its mark is missing): a
        # firewall reload flushed the ruleset (nftables.service does, and reloads this unit).
        replaced = ws is not None and (
            listing is None or not hostowner.marked_by(paths, table_comment(listing))
        )
        if (stale or replaced) and paths.nft_transaction_file.exists():
            kept = disposables_statements(running_disposables(paths))
            statements = paths.nft_transaction_file.read_text() + kept
            net.load_table(statements, comment=hostowner.owner_mark(paths))
            if replaced:
                changes.append(f"put back the nft table {TABLE} as qnix last loaded it")
            else:
                changes.append(f"removed the nft elements of {', '.join(sorted(stale))}")
    return changes
