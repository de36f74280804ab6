"""Disposables: a fresh compartment from a template for one command (`qnix dispose`), for
several (open-in-disposable, calls to @dispvm), and the preloaded ones that wait.

A disposable `disp<N>` gets a tmpfs home, a namespace and a /31 of its own (the first free
slot from the hash of its name), and elements in the nft table that send it to its template's
chain (qnix.compile.nft). Its keeper removes all of it when the command ends, or when the
`qnix dispose` that owns it exits, however it exits; `apply` keeps a running disposable's
elements when it reloads the table. With `preload = N` on a template, N wait, started, for a
`qnix dispose` to claim one (Qubes' preloaded disposables).
"""

from __future__ import annotations

import _socket
import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from qnix.audit import events
from qnix.compile import names
from qnix.compile.nft import disposable_elements
from qnix.errors import QnixError
from qnix.runtime import hostowner
from qnix.runtime.agent import AgentError, ProtocolError
from qnix.runtime.backends.namespace import HostIdentity
from qnix.runtime.files import atomic_write
from qnix.runtime.keeper import teardown_network
from qnix.runtime.lifecycle import (
    check_gui_host,
    cleanup_run,
    keeper_config,
    run_gui_app,
    spawn_keeper,
    stop_locked,
)
from qnix.runtime.live import (
    READY_TIMEOUT,
    KeeperConfig,
    ensure_dir,
    ensure_root,
    live_workstation,
    locked,
    network_for,
    preloaded,
    require_live,
    running_disposables,
    uplink_of,
)
from qnix.runtime.net import Uplink, require_root
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.quickrun import (
    claim_preloaded,
    execute,
    keeper_alive,
    refill_in_background,
    running_state,
)
from qnix.spec.model import Compartment, Workstation

# `qnix dispose` turns these into an orderly exit, so that its disposable is removed.
DISPOSE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _free_disposable_name(paths: RuntimePaths, ws: Workstation) -> str:
    number = 1
    while True:
        name = f"disp{number}"
        taken = name in ws.compartments or paths.run_dir(name).exists()
        if not taken and not paths.netns_path(name).exists():
            return name
        number += 1


def disposable_link(ws: Workstation, name: str, taken_by_disposables: set[int]) -> names.Link:
    """The /31 of disposable `name`: the first free slot from the hash of its name."""
    slot = _free_slot(ws, name, taken_by_disposables)
    gateway = ipaddress.IPv4Network(ws.host.subnet).network_address + 2 * slot
    return names.Link(str(gateway), str(gateway + 1))


def _free_slot(ws: Workstation, name: str, taken_by_disposables: set[int]) -> int:
    """A /31 slot no compartment of the spec and no running disposable holds: by the hash of
    the name, probing upwards (as names.allocate_links does)."""
    network = ipaddress.IPv4Network(ws.host.subnet)
    slots = network.num_addresses // 2
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    taken = {0} | {names.link_slot(link.gateway, ws.host.subnet) for link in links.values()}
    taken |= taken_by_disposables
    if len(taken) >= slots:
        raise QnixError(f"no free link left in {ws.host.subnet} for a disposable")
    slot = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) % slots
    while slot in taken:
        slot = (slot + 1) % slots
    return slot


def plan_disposable(
    paths: RuntimePaths,
    ws: Workstation,
    template_name: str | None,
    *,
    preload: bool = False,
    owner_pid: int | None = None,
    compositor: str | None = None,
) -> tuple[KeeperConfig, Uplink | None]:
    """A fresh disposable from a template, planned: its name, link, elements and keeper
    configuration. It ends when `owner_pid` exits, or — preloaded — when the `qnix dispose`
    that claims it lets go, or (neither) when the owner its keeper is given goes."""
    chosen = template_name or ws.default_disposable
    if chosen is None:
        raise QnixError(
            "no disposable template named, and the spec has no default_disposable",
            hint="qnix dispose --template NAME -- COMMAND",
        )
    template = ws.disposable_templates.get(chosen)
    if template is None:
        known = ", ".join(ws.disposable_templates) or "none"
        raise QnixError(f"no disposable template {chosen!r}", hint=f"known: {known}")
    running = running_disposables(paths)
    name = _free_disposable_name(paths, ws)
    compartment = Compartment.model_validate(
        {
            **{key: value for key, value in template if key != "preload"},
            "name": name,
            "persistence": "disposable",
        }
    )
    taken = {
        names.link_slot(c.gateway, ws.host.subnet)
        for c in running.values()
        if c.gateway is not None
    }
    link = disposable_link(ws, name, taken)
    slot = names.link_slot(link.gateway, ws.host.subnet)
    uplink = uplink_of(ws, compartment, link)
    extra: dict[str, Any] = {
        "template": chosen,
        "owner_pid": owner_pid,
        "netns_prefix": paths.netns_prefix,
        "host_netns": paths.host_netns,
        "claim_socket": str(paths.pool_dir(chosen) / f"{name}.sock") if preload else None,
        "compositor": compositor,
    }
    if uplink is not None:
        elements = disposable_elements(ws, chosen, uplink.host_ifname, link.address)
        extra |= {
            "host_ifname": uplink.host_ifname,
            "address": link.address,
            "gateway": link.gateway,
            "elements": tuple(elements.items()),
        }
    identity = HostIdentity(names.HOST_ID_BASE + slot, names.HOST_ID_BASE + slot)
    return keeper_config(paths, ws, compartment, identity, **extra), uplink


def set_up_disposable(
    paths: RuntimePaths, config: KeeperConfig, uplink: Uplink | None, *, link: bool = True
) -> None:
    """A planned disposable's namespace, run folder and (with `link`) its link and nft
    elements. The caller holds the lock, and removes all of it (teardown_network,
    cleanup_run) if its start fails."""
    net = network_for(paths)
    hostowner.require_host_network(paths, net)
    if uplink is None:
        net.ensure_netns(config.name)
    else:
        net.bind_netns(config.name)  # its loopback comes up with its link
    if link:
        link_disposable(paths, config, uplink)
    ensure_root(paths.run_root)
    ensure_dir(paths.compartments_run, 0o711)
    ensure_dir(paths.run_dir(config.name), 0o711)
    if config.claim_socket is not None and config.template is not None:
        ensure_dir(paths.pool_root, 0o700)
        ensure_dir(paths.pool_dir(config.template), 0o700)


def link_disposable(paths: RuntimePaths, config: KeeperConfig, uplink: Uplink | None) -> None:
    """A disposable's veth pair into its namespace, and its nft elements."""
    if uplink is not None:
        net = network_for(paths)
        net.ensure_link(config.name, uplink)
        net.add_elements(config.elements)


def _create_disposable(
    paths: RuntimePaths, ws: Workstation, template_name: str | None, *, preload: bool = False
) -> KeeperConfig:
    """A fresh disposable from a template, running: namespace, link, nft elements, keeper
    (which ends it, and removes all of it, when this process exits — or, preloaded, when the
    `qnix dispose` that claims it exits). The caller holds the lock."""
    owner = None if preload else os.getpid()
    config, uplink = plan_disposable(paths, ws, template_name, preload=preload, owner_pid=owner)
    try:
        set_up_disposable(paths, config, uplink)
        spawn_keeper(paths, config)
    except BaseException:
        teardown_network(config)
        cleanup_run(paths, config.name)
        raise
    return config


def write_pool_file(paths: RuntimePaths, ws: Workstation) -> None:
    """What `qnix dispose`'s fast path needs to know without reading the spec."""
    pool = {
        "default": ws.default_disposable,
        "preload": {name: t.preload for name, t in sorted(ws.disposable_templates.items())},
    }
    ensure_dir(paths.pool_root, 0o700)
    data = (json.dumps(pool, indent=2, sort_keys=True) + "\n").encode()
    if not paths.pool_file.exists() or paths.pool_file.read_bytes() != data:
        atomic_write(paths.pool_file, data, 0o600)


def fill_pools(paths: RuntimePaths, ws: Workstation) -> list[str]:
    """Start preloaded disposables until each template has its `preload`; stop the ones a
    template no longer wants. The caller holds the lock."""
    changes = []
    waiting: dict[str, list[str]] = {}
    for name, config in sorted(preloaded(paths).items()):
        waiting.setdefault(config.template or "", []).append(name)
    for template_name, template in sorted(ws.disposable_templates.items()):
        have = waiting.pop(template_name, [])
        for name in have[template.preload :]:
            stop_locked(paths, name, audit=False)
            changes.append(f"{name}: stopped (more preloaded {template_name} than wanted)")
        for _ in range(template.preload - len(have)):
            config = _create_disposable(paths, ws, template_name, preload=True)
            events.record(
                paths,
                "start",
                compartment=config.name,
                template=template_name,
                result="ok",
                preloaded=True,
            )
            changes.append(f"{config.name}: preloaded disposable of {template_name}")
    for names_left in waiting.values():
        for name in names_left:
            stop_locked(paths, name, audit=False)
            changes.append(f"{name}: stopped (its template is gone)")
    return changes


def refill_pools(paths: RuntimePaths) -> list[str]:
    """Top up the preloaded disposables of the live generation (after one was claimed)."""
    require_root()
    if not paths.generation_dir.exists():
        return []  # `qnix down` came first: recreate nothing of the run root
    with locked(paths):
        ws = live_workstation(paths)
        return [] if ws is None else fill_pools(paths, ws)


def _exit_on_signal(number: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + number)


@contextlib.contextmanager
def new_disposable(
    paths: RuntimePaths, template: str | None = None
) -> Iterator[tuple[KeeperConfig, dict[str, Any]]]:
    """A disposable of `template` (its keeper configuration and running state) for several
    commands (open-in-disposable, calls to @dispvm): a preloaded one when the template has
    one ready, else a fresh one. Gone when the block ends, however it ends; usable from any
    thread (a keeper's call server)."""
    require_root()
    with locked(paths):
        ws = require_live(paths)
    chosen = template or ws.default_disposable
    claimed = claim_preloaded(paths, chosen) if chosen is not None else None
    if claimed is not None:
        with _claimed_disposable(paths, *claimed) as used:
            yield used
        return
    with locked(paths):
        config = _create_disposable(paths, require_live(paths), template)
    # Signals reach the main thread only: there, ending by one still removes the disposable.
    in_main = threading.current_thread() is threading.main_thread()
    previous = (
        {number: signal.signal(number, _exit_on_signal) for number in DISPOSE_SIGNALS}
        if in_main
        else {}
    )
    try:
        state = running_state(paths, config.name)
        if state is None:
            raise QnixError(f"disposable {config.name} ended before it could be used")
        yield config, state
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop_locked(paths, config.name, audit=False)
        teardown_network(config)


@contextlib.contextmanager
def _claimed_disposable(
    paths: RuntimePaths, name: str, connection: _socket.socket
) -> Iterator[tuple[KeeperConfig, dict[str, Any]]]:
    """A preloaded disposable this process claimed: it ends when `connection` closes (also
    when this process dies); the block ends once its keeper has removed all of it."""
    state = running_state(paths, name)
    try:
        if state is None:
            raise QnixError(f"preloaded disposable {name} ended before it could be used")
        config = KeeperConfig.from_json(paths.keeper_config(name).read_bytes())
        yield config, state
    finally:
        refill_in_background(paths)
        connection.close()
        # The keeper exits after it has removed the disposable.
        deadline = time.monotonic() + READY_TIMEOUT
        while state is not None and keeper_alive(state) and time.monotonic() < deadline:
            time.sleep(0.02)


def _check_gui_template(ws: Workstation, template: str | None) -> None:
    """`qnix dispose --gui`: the template must have `gui = true`, and there must be a Wayland
    compositor to show it on (X11 is refused)."""
    chosen = template or ws.default_disposable
    found = ws.disposable_templates.get(chosen) if chosen is not None else None
    if found is not None and not found.gui:
        raise QnixError(
            f"disposable template {chosen} has no GUI",
            hint=f"set gui = true for disposable_templates.{chosen} and apply",
        )
    check_gui_host(dict(os.environ))


def dispose(
    paths: RuntimePaths, argv: Sequence[str], template: str | None = None, *, gui: bool = False
) -> int:
    """Run argv in a fresh disposable with our stdio; when it ends (or this command is
    stopped or killed) nothing of the disposable is left. Its exit code. With `gui`, argv is
    a GUI app: the template must have `gui = true`; the disposable's own Wayland filter shows
    it on this session's compositor, and it runs in a cgroup scope of its own."""
    require_root()
    with locked(paths):
        ws = require_live(paths)
        if gui:
            _check_gui_template(ws, template)
        config = _create_disposable(paths, ws, template)
    name = config.name
    previous = {number: signal.signal(number, _exit_on_signal) for number in DISPOSE_SIGNALS}
    try:
        state = running_state(paths, name)
        if state is None:
            raise QnixError(f"disposable {name} ended before its command could run")
        if gui and not state.get("gui"):
            raise QnixError(f"disposable {name} started without its Wayland filter")
        try:
            if gui:
                return run_gui_app(
                    paths, name, state, argv, event="dispose", template=config.template, gui=True
                )
            return execute(paths, name, state, argv, event="dispose", template=config.template)
        except (AgentError, ProtocolError) as exc:
            raise QnixError(f"cannot run in disposable {name}: {exc}") from exc
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop_locked(paths, name, audit=False)
        teardown_network(config)
