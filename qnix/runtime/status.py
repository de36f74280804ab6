"""`qnix ls`: each compartment of the live generation and each running disposable, as the
host's records show them."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from qnix.compile import names
from qnix.errors import QnixError
from qnix.runtime import cgroups
from qnix.runtime.live import live_workstation, preloaded, running_disposables
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.quickrun import (
    keeper_alive,
    read_state,
)
from qnix.spec.model import NETWORK_NONE


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    name: str
    label: str
    isolation: str
    state: str  # running, stopped, or crashed (a run folder without its keeper: see gc)
    network: str
    address: str | None
    gateway: str | None
    memory_mb: int
    memory_used: int | None  # bytes, while running
    persistence: str
    autostart: bool
    pid: int | None  # the keeper's
    template: str | None = None  # a running disposable's

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _memory_used(paths: RuntimePaths, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, QnixError):
        cgroup = cgroups.cgroup_of(paths.cgroup_name(name), cgroups.detect())
        for path in cgroup.paths:
            for file in ("memory.current", "memory.usage_in_bytes"):
                if (path / file).exists():
                    return int((path / file).read_text())
    return None


def statuses(paths: RuntimePaths) -> list[Status]:
    ws = live_workstation(paths)
    if ws is None:
        return []
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    found = []
    for compartment in ws.compartments.values():
        name = compartment.name
        state = read_state(paths, name)
        if state is not None and keeper_alive(state):
            status, pid = "running", int(state["keeper_pid"])
        else:
            status, pid = ("crashed" if paths.run_dir(name).exists() else "stopped"), None
        networked = compartment.network != NETWORK_NONE
        found.append(
            Status(
                name=name,
                label=compartment.label,
                isolation=compartment.isolation,
                state=status,
                network=compartment.network,
                address=links[name].address if networked else None,
                gateway=links[name].gateway if networked else None,
                memory_mb=compartment.memory_mb,
                memory_used=_memory_used(paths, name) if status == "running" else None,
                persistence=compartment.persistence,
                autostart=compartment.autostart,
                pid=pid,
            )
        )
    waiting = preloaded(paths)
    for name, config in sorted(running_disposables(paths).items()):
        state = read_state(paths, name)
        template = ws.disposable_templates.get(config.template or "")
        found.append(
            Status(
                name=name,
                label=template.label if template is not None else "red",
                isolation=template.isolation if template is not None else "namespace",
                state="preloaded" if name in waiting else "running",
                network=template.network if template is not None else NETWORK_NONE,
                address=config.address,
                gateway=config.gateway,
                memory_mb=config.memory_bytes >> 20,
                memory_used=_memory_used(paths, name),
                persistence="disposable",
                autostart=False,
                pid=int(state["keeper_pid"]) if state is not None else None,
                template=config.template,
            )
        )
    return found
