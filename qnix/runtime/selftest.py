"""`qnix selftest`: the live host proves, from inside its running compartments, the isolation
the live generation's spec and policy promise.

Every probe runs inside a compartment as its own user, through its agent, with the
compartment's `python3 -I -S -c` and the program qnix.inside.selftest: nothing is loosened to
test it, and nothing is left behind (a listener ends when its stdin does, or after
LISTEN_SECONDS at the latest).

* In each running compartment (`checks`): no capabilities, NoNewPrivs 1 and a seccomp filter
  (Seccomp 2) in /proc/self/status; its own user; a pid namespace other than the host's; /usr
  read-only; exactly its declared secrets under /run/secrets; and a compartment with
  `network = "none"` only loopback.
* For every ordered pair of running compartments with a network (`connections`): a listener
  in the target on each port the policy's `qnix.Net` lines open from the source to it and on
  CLOSED_PORT, a probe from the source on each; allowed must be open, denied closed.
* The host's kernel parameters against the hardening profile's (`sysctls`). qnix sets them
  only on NixOS (the flake's hardening module): there a mismatch is a violation, on any other
  host a warning about the host's own configuration.

Recorded in the audit log as event `selftest`: the compartments probed, the numbers of checks
and connections, and the violations.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qnix.audit import events
from qnix.compile.nix import hardening
from qnix.compile.openings import Opening, compile_openings
from qnix.errors import QnixError
from qnix.inside import selftest as probe_program
from qnix.policy.evaluate import system_from_workstation
from qnix.policy.load import load_policy_dir
from qnix.runtime import agent
from qnix.runtime.drift import read_sysctls
from qnix.runtime.live import network_for, require_live, uplink_of
from qnix.runtime.net import require_root
from qnix.runtime.paths import RuntimePaths
from qnix.runtime.quickrun import running_state
from qnix.spec.model import NETWORK_NONE, Workstation

# The port every target listens on that no policy opens to it (unless one does: then the
# next free one).
CLOSED_PORT = 47813
CONNECT_TIMEOUT = 1.0
LISTEN_SECONDS = 120.0
PROBE_SOURCE = Path(probe_program.__file__).read_text(encoding="utf-8")
NO_CAPABILITIES = "0000000000000000"
NIXOS_MARKER = Path("/etc/NIXOS")


@dataclass(frozen=True, slots=True)
class Check:
    """One property of one running compartment, as seen from inside it."""

    compartment: str
    check: str
    expected: str
    actual: str

    @property
    def violated(self) -> bool:
        return self.expected != self.actual

    def to_json(self) -> dict[str, Any]:
        return {
            "compartment": self.compartment,
            "check": self.check,
            "expected": self.expected,
            "actual": self.actual,
            "violation": self.violated,
        }


@dataclass(frozen=True, slots=True)
class Connection:
    """A probe from `source` to `proto`/`port` of `target`, which a listener there answers."""

    source: str
    target: str
    proto: str
    port: int
    allowed: bool
    opened: bool
    rule: str = ""

    @property
    def violated(self) -> bool:
        return self.allowed != self.opened

    @property
    def verdict(self) -> str:
        if self.violated:
            return "VIOLATION: open" if self.opened else "VIOLATION: closed"
        return "allowed and open" if self.opened else "denied and closed"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "proto": self.proto,
            "port": self.port,
            "allowed": self.allowed,
            "open": self.opened,
            "rule": self.rule,
            "violation": self.violated,
        }


@dataclass(frozen=True, slots=True)
class SysctlCheck:
    key: str
    expected: str
    actual: str | None
    enforced: bool  # NixOS: qnix set it, so a mismatch is a violation

    @property
    def violated(self) -> bool:
        return self.enforced and self.expected != self.actual

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "expected": self.expected,
            "actual": self.actual,
            "violation": self.violated,
            "warning": not self.enforced and self.expected != self.actual,
        }


@dataclass(frozen=True, slots=True)
class Report:
    checks: tuple[Check, ...]
    connections: tuple[Connection, ...]
    sysctls: tuple[SysctlCheck, ...]
    sysctls_enforced: bool

    @property
    def violations(self) -> list[str]:
        """Each violation in one line, the compartments' first."""
        found = [
            f"{c.compartment}: {c.check} is {c.actual}, not {c.expected}"
            for c in self.checks
            if c.violated
        ]
        found += [
            f"{c.source} -> {c.target} {c.proto}/{c.port}: "
            f"{'open' if c.opened else 'closed'}, the policy says "
            f"{'allowed' if c.allowed else 'denied'}"
            for c in self.connections
            if c.violated
        ]
        found += [
            f"host sysctl {s.key} is {s.actual}, not {s.expected}"
            for s in self.sysctls
            if s.violated
        ]
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": [c.to_json() for c in self.checks],
            "connections": [c.to_json() for c in self.connections],
            "sysctls": [s.to_json() for s in self.sysctls],
            "sysctls_enforced": self.sysctls_enforced,
            "violations": self.violations,
        }


# ---- running a probe inside -----------------------------------------------------------------


class Inside:
    """Runs the probe program in one running compartment, as its user, through its agent."""

    def __init__(self, paths: RuntimePaths, name: str) -> None:
        state = running_state(paths, name)
        if state is None:
            raise QnixError(f"compartment {name} stopped during the selftest")
        self.name = name
        self.socket = str(paths.agent_socket(name))
        self.env = {str(k): str(v) for k, v in state["env"].items()}
        self.cwd = str(state["cwd"])
        self.peer_uid = int(state["host_uid"])

    def argv(self, *args: str) -> list[str]:
        return ["python3", "-I", "-S", "-c", PROBE_SOURCE, *args]

    def answer(self, *args: str) -> dict[str, Any]:
        """The probe's one JSON line (untrusted: it comes from inside)."""
        with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as nothing:
            try:
                code = agent.execute(
                    self.socket,
                    self.argv(*args),
                    env=self.env,
                    cwd=self.cwd,
                    stdio=(nothing.fileno(), out.fileno(), out.fileno()),
                    peer_uid=self.peer_uid,
                )
            except (agent.AgentError, agent.ProtocolError) as exc:
                raise QnixError(f"the selftest probe in {self.name} did not run: {exc}") from exc
            out.seek(0)
            untrusted_output = out.read(1 << 16).decode(errors="replace")
        try:
            untrusted = json.loads(untrusted_output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            untrusted = None
        if code != 0 or not isinstance(untrusted, dict):
            raise QnixError(
                f"the selftest probe in {self.name} failed (exit code {code}): "
                f"{untrusted_output.strip()[-300:]}",
                hint="the probes need python3 inside the compartment (under /usr)",
            )
        return untrusted


class Listener:
    """The probe program listening in a compartment until `close()` ends its stdin."""

    def __init__(self, inside: Inside, address: str, ports: Sequence[tuple[str, int]]) -> None:
        self.inside = inside
        self.stdin_read, self.stdin_write = os.pipe()
        self.out_read, self.out_write = os.pipe()
        self.error: BaseException | None = None
        wanted = [f"{proto}:{port}" for proto, port in ports]
        argv = inside.argv("listen", str(LISTEN_SECONDS), address, *wanted)
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.out_read, 4096)
            if not chunk:
                break
            line += chunk
        if b'"ready"' not in line:
            self.close()
            raise QnixError(
                f"the selftest listener in {inside.name} did not start: "
                f"{self.error or line.decode(errors='replace').strip()[-300:]}"
            )

    def _run(self, argv: list[str]) -> None:
        try:
            agent.execute(
                self.inside.socket,
                argv,
                env=self.inside.env,
                cwd=self.inside.cwd,
                stdio=(self.stdin_read, self.out_write, self.out_write),
                peer_uid=self.inside.peer_uid,
            )
        except (agent.AgentError, agent.ProtocolError, OSError) as exc:
            self.error = exc
        finally:
            os.close(self.out_write)  # the reader sees the end if it never said ready

    def close(self) -> None:
        os.close(self.stdin_write)
        self.thread.join(LISTEN_SECONDS + 10)
        os.close(self.stdin_read)
        os.close(self.out_read)


# ---- what must hold -------------------------------------------------------------------------


def compartment_checks(
    ws: Workstation, name: str, untrusted: dict[str, Any], host_pid_ns: str
) -> list[Check]:
    compartment = ws.compartments[name]
    status = untrusted.get("status")
    status = status if isinstance(status, dict) else {}

    def check(what: str, expected: str, actual: object) -> Check:
        return Check(name, what, expected, str(actual))

    seccomp = str(status.get("Seccomp"))
    secrets = untrusted.get("secrets")
    found_secrets = sorted(map(str, secrets)) if isinstance(secrets, list) else ["?"]
    found = [
        check(f"capabilities {field}", NO_CAPABILITIES, status.get(field))
        for field in ("CapPrm", "CapEff", "CapBnd", "CapAmb")
    ]
    found += [
        check("no_new_privs", "1", status.get("NoNewPrivs")),
        check("seccomp", "2 (filter)", f"{seccomp} (filter)" if seccomp == "2" else seccomp),
        check("user", compartment.user, untrusted.get("user")),
        check(
            "pid namespace",
            "its own",
            "the host's" if untrusted.get("pid_ns") == host_pid_ns else "its own",
        ),
        check("/usr", "read-only", "read-only" if untrusted.get("usr_read_only") else "writable"),
        check(
            "secrets",
            ", ".join(sorted(compartment.secrets)) or "none",
            ", ".join(found_secrets) or "none",
        ),
    ]
    if compartment.network == NETWORK_NONE:
        interfaces = untrusted.get("interfaces")
        shown = ", ".join(map(str, interfaces)) if isinstance(interfaces, list) else "?"
        found.append(check("interfaces", "lo", shown))
    return found


def live_openings(paths: RuntimePaths, ws: Workstation) -> list[Opening]:
    policy = load_policy_dir(paths.generation_dir / "policy")
    compiled = compile_openings(ws, policy, system_from_workstation(ws))
    return list(compiled.openings)


def probe_plan(
    networked: Sequence[str], openings: Sequence[Opening]
) -> dict[str, list[tuple[str, str, int, Opening | None]]]:
    """For each target: (source, proto, port, the opening or None) to probe."""
    plan: dict[str, list[tuple[str, str, int, Opening | None]]] = {}
    for target in networked:
        to_target = [o for o in openings if o.target == target]
        closed = CLOSED_PORT
        while any(o.proto == "tcp" and o.port == closed for o in to_target):
            closed += 1
        probes: list[tuple[str, str, int, Opening | None]] = []
        for source in networked:
            if source == target:
                continue
            for opening in to_target:
                if opening.source == source:
                    probes.append((source, opening.proto, opening.port, opening))
            probes.append((source, "tcp", closed, None))
        plan[target] = probes
    return plan


def connection_matrix(
    ws: Workstation,
    insides: dict[str, Inside],
    openings: Sequence[Opening],
) -> list[Connection]:
    networked = sorted(n for n in insides if ws.compartments[n].network != NETWORK_NONE)
    found: list[Connection] = []
    for target, probes in probe_plan(networked, openings).items():
        uplink = uplink_of(ws, ws.compartments[target])
        assert uplink is not None  # networked
        ports = sorted({(proto, port) for _, proto, port, _ in probes})
        listener = Listener(insides[target], uplink.link.address, ports)
        try:
            for source, proto, port, opening in probes:
                untrusted = insides[source].answer(
                    "connect", uplink.link.address, proto, str(port), str(CONNECT_TIMEOUT)
                )
                found.append(
                    Connection(
                        source,
                        target,
                        proto,
                        port,
                        allowed=opening is not None,
                        opened=untrusted.get("result") == "open",
                        rule=opening.rule if opening is not None else "",
                    )
                )
        finally:
            listener.close()
    return sorted(found, key=lambda c: (c.source, c.target, c.proto, c.port))


def sysctl_checks(paths: RuntimePaths, ws: Workstation, enforced: bool) -> list[SysctlCheck]:
    wanted = hardening.sysctls(ws)
    actual = read_sysctls(network_for(paths), paths.host_netns, sorted(wanted))
    return [
        SysctlCheck(key, str(value), actual.get(key), enforced) for key, value in wanted.items()
    ]


def selftest(paths: RuntimePaths) -> Report:
    """Probe every running compartment of the live generation (disposables are not probed);
    recorded in the audit log (event `selftest`)."""
    require_root()
    ws = require_live(paths)
    running = [n for n in sorted(ws.compartments) if running_state(paths, n) is not None]
    insides = {name: Inside(paths, name) for name in running}
    host_pid_ns = os.readlink("/proc/self/ns/pid")
    checks: list[Check] = []
    for name, inside in insides.items():
        checks += compartment_checks(ws, name, inside.answer("status"), host_pid_ns)
    connections = connection_matrix(ws, insides, live_openings(paths, ws))
    enforced = NIXOS_MARKER.exists()  # only there did qnix set the kernel parameters
    report = Report(
        tuple(checks), tuple(connections), tuple(sysctl_checks(paths, ws, enforced)), enforced
    )
    events.record(
        paths,
        "selftest",
        compartments=running,
        checks=len(checks),
        connections=len(connections),
        violations=report.violations,
    )
    return report
