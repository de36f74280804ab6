"""Calls from inside a compartment (Qubes' qrexec-client-vm and the daemon that answers it).

Each compartment's keeper serves a call socket, `<run dir>/call/call.sock` on the host, which
the compartment sees at /run/qnix-call/call.sock (qnix/inside/call.py is the client). The folder
is root's and bound read-only, so the compartment can connect but not remove, replace or
redirect the socket; only the compartment's host uid may connect (0660, its group; SO_PEERCRED
is checked on every connection).

A call is one connection: one framed request (the agent's framing: 4-byte length, at most 64 KiB
of JSON) with the caller's stdin, stdout and stderr as SCM_RIGHTS descriptors. Everything in it
is untrusted and checked (fields, service and argument charset as the policy parser wants them,
target, descriptors); a malformed request, an unknown service, a deny, or any error refuses the
call with a short reason and nothing runs anywhere. The source of a decision is the compartment
this server belongs to, never anything the request says. An allowed call runs the service's
handler (qnix.broker.services) in the target through the target's agent, with the caller's
descriptors as its stdio, starting the target first when it is stopped and the policy line
allows autostart (a call the policy sends to @dispvm:T runs in a disposable of template T of
its own, preloaded if T keeps some, which ends with the handler); the handler's exit code goes
back to the caller. Every call is audited
("call": source, service, target, decision, exit code) besides the policy decision itself.

Nobody sits at a terminal for a call from a compartment: an `ask` line leaves a question for
`qnix policy asks` / `qnix policy answer ID TARGET|no` (QNIX_ASK_TIMEOUT seconds, default 60);
no answer denies. At most MAX_CALLS calls per compartment run at once; a request must arrive within
REQUEST_TIMEOUT seconds.

This module is imported by the keeper before its compartment starts, so the policy machinery
(qnix.broker.decide, qnix.runtime.lifecycle, qnix.runtime.disposables) is imported on the first
call only.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import socket
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qnix.audit import events
from qnix.broker.services import service_argv
from qnix.runtime import agent, quickrun
from qnix.runtime.paths import RuntimePaths

if TYPE_CHECKING:
    from qnix.policy.evaluate import Decision

MAX_CALLS = 8
REQUEST_TIMEOUT = 10.0
REPLY_TIMEOUT = 5.0
REFUSED = 126  # the caller's exit code for a refused call (as qrexec)

# As the policy evaluator checks them (qnix.policy.evaluate.REQUEST_SERVICE_RE and
# REQUEST_ARGUMENT_RE); a target is a compartment name or one of the policy's @tokens.
SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ARGUMENT_RE = re.compile(r"(\+[A-Za-z0-9_.+-]{0,64})?")
TARGET_RE = re.compile(
    r"@default|@dispvm|@dispvm:[a-z][a-z0-9-]{0,30}|@adminvm|[a-z][a-z0-9-]{0,30}"
)
REQUEST_FIELDS = frozenset({"op", "target", "service", "argument"})
HOST_TARGET = "@adminvm"
HEADER_SIZE = 4  # the agent's framing: a big-endian length, then JSON
MAX_REQUEST_FDS = 3
DISPVM_PREFIX = "@dispvm:"


class CallRefused(Exception):
    """The call is refused; the message is for the caller (keep it short and generic)."""

    def __init__(self, message: str, decision: str = "refused", reason: str = "") -> None:
        super().__init__(message)
        self.decision = decision
        self.reason = reason or message


# ---- the socket -----------------------------------------------------------------------------


# ---- one request ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A checked request: what the caller asks for (never who it is)."""

    target: str
    service: str
    argument: str


def _check_descriptor(fd: int) -> None:
    """Stdio for a program: no folder (openat() below it would reach the caller's files)
    and no O_PATH handle."""
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise CallRefused("unusable descriptor") from None
    if stat.S_ISDIR(mode) or flags & getattr(os, "O_PATH", 0o10000000):
        raise CallRefused("stdio must be files, pipes, sockets or terminals")


def validate_request(untrusted: Mapping[str, Any], untrusted_fds: Sequence[int]) -> CallRequest:
    """A call request checked field by field; CallRefused names what is wrong."""
    if untrusted.get("op") != "call":
        raise CallRefused("not a call request")
    unknown = set(untrusted) - REQUEST_FIELDS
    if unknown:
        shown = ", ".join(sorted(repr(k[:32]) for k in unknown)[:4])
        raise CallRefused(f"unknown fields in the request: {shown}")
    untrusted_target = untrusted.get("target")
    untrusted_service = untrusted.get("service")
    untrusted_argument = untrusted.get("argument", "")
    if not isinstance(untrusted_service, str) or not SERVICE_RE.fullmatch(untrusted_service):
        raise CallRefused("invalid service name")
    if not isinstance(untrusted_argument, str) or not ARGUMENT_RE.fullmatch(untrusted_argument):
        raise CallRefused("invalid service argument")
    if not isinstance(untrusted_target, str) or not TARGET_RE.fullmatch(untrusted_target):
        raise CallRefused("invalid target")
    if len(untrusted_fds) != 3:
        raise CallRefused("a call carries exactly three descriptors: stdin, stdout, stderr")
    for fd in untrusted_fds:
        _check_descriptor(fd)
    return CallRequest(untrusted_target, untrusted_service, untrusted_argument)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _recv_exact(conn: socket.socket, size: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < size:
        chunk, ancillary, flags, _ = conn.recvmsg(
            size - len(data), socket.CMSG_SPACE(MAX_REQUEST_FDS * 4)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                whole = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:whole]))
        if flags & socket.MSG_CTRUNC:
            raise CallRefused("too many descriptors", "malformed")
        if not chunk:
            raise CallRefused("malformed request", "malformed", "closed mid-request")
        data += chunk
    return data


def recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One framed request (agent framing) and its descriptors; CallRefused, with every
    descriptor received closed, for anything malformed. (Not agent.recv_message: a call
    request has no `op`, and its refusals tell the caller which limit it crossed.)"""
    fds: list[int] = []
    try:
        size = int.from_bytes(_recv_exact(conn, HEADER_SIZE, fds), "big")
        if size > agent.MAX_MESSAGE:
            raise CallRefused("request too large", "malformed", f"{size} bytes")
        body = _recv_exact(conn, size, fds)
        if len(fds) > MAX_REQUEST_FDS:
            raise CallRefused("too many descriptors", "malformed")
        untrusted = json.loads(body)
        if not isinstance(untrusted, dict):
            raise CallRefused("malformed request", "malformed", "not a JSON object")
    except CallRefused:
        _close_all(fds)
        raise
    except (OSError, ValueError, RecursionError) as exc:
        _close_all(fds)
        raise CallRefused("malformed request", "malformed", str(exc)[:200]) from None
    return untrusted, fds


def _interpreter_of(paths: RuntimePaths, name: str) -> str:
    """The Python the target's agent runs with (its keeper's configuration, root's file)."""
    try:
        value = json.loads(paths.keeper_config(name).read_bytes()).get("interpreter")
    except (OSError, ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value.startswith("/"):
        raise CallRefused("the target is not reachable", reason="no interpreter recorded")
    return value


# ---- the server -----------------------------------------------------------------------------


@dataclass
class CallOutcome:
    """What the audit records of one call."""

    service: str = ""
    argument: str = ""
    target: str = ""
    resolved_target: str | None = None
    disposable: str | None = None  # the one a call to @dispvm:T ran in
    decision: str = "refused"
    code: int | None = None
    reason: str = ""


class CallServer:
    """Answers the calls of one compartment (`source`) on its call socket."""

    def __init__(
        self,
        paths: RuntimePaths,
        source: str,
        host_uid: int,
        listener: socket.socket,
        max_calls: int = MAX_CALLS,
    ) -> None:
        self.paths = paths
        self.source = source
        self.host_uid = host_uid
        self.listener = listener
        self.slots = threading.BoundedSemaphore(max_calls)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.slots.acquire(blocking=False):
                self._audit(CallOutcome(reason="too many calls at once"))
                self._reply(conn, {"op": "refused", "message": "too many calls at once"})
                conn.close()
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle(conn)
        finally:
            self.slots.release()

    def _reply(self, conn: socket.socket, message: dict[str, Any]) -> None:
        """Best effort: a caller that has gone, or stopped reading, loses the answer."""
        with contextlib.suppress(OSError, agent.ProtocolError):
            conn.settimeout(REPLY_TIMEOUT)
            agent.send_message(conn, message)

    def _audit(self, outcome: CallOutcome) -> None:
        try:
            events.record(
                self.paths,
                "call",
                source=self.source,
                service=outcome.service[:64],
                argument=outcome.argument[:66],
                target=outcome.target[:64],
                resolved_target=outcome.resolved_target,
                disposable=outcome.disposable,
                decision=outcome.decision,
                code=outcome.code,
                reason=outcome.reason[:512],
            )
        except (OSError, ValueError) as exc:
            print(f"keeper: cannot audit a call: {exc}", file=sys.stderr, flush=True)

    def handle(self, conn: socket.socket) -> None:
        """One connection: one call, audited, then answered; never raises."""
        outcome = CallOutcome()
        fds: list[int] = []
        answer: dict[str, Any]
        try:
            uid = agent.uid_of_peer(conn)
            if uid != self.host_uid:
                raise CallRefused("not this compartment's caller", reason=f"peer uid {uid}")
            conn.settimeout(REQUEST_TIMEOUT)
            untrusted, fds = recv_request(conn)
            try:
                request = validate_request(untrusted, fds)
            except CallRefused as exc:
                raise CallRefused(str(exc), "malformed") from None
            outcome.service, outcome.argument = request.service, request.argument
            outcome.target = request.target
            outcome.code = self._call(conn, request, fds, outcome)
            outcome.decision = "allow"
            answer = {"op": "exited", "code": outcome.code}
        except CallRefused as exc:
            outcome.decision, outcome.reason = exc.decision, exc.reason
            outcome.code = REFUSED
            answer = {"op": "refused", "message": str(exc)}
        except Exception as exc:  # any error refuses the call
            outcome.decision, outcome.reason = "error", f"{type(exc).__name__}: {exc}"
            outcome.code = REFUSED
            answer = {"op": "error", "message": "the call failed on the host"}
        finally:
            _close_all(fds)
        # Recorded before the caller learns the outcome.
        self._audit(outcome)
        self._reply(conn, answer)

    def _decide(self, request: CallRequest) -> Decision:
        from qnix.broker.decide import PendingAsker, ask_timeout, decide

        try:
            return decide(
                self.paths,
                untrusted_service=request.service,
                untrusted_argument=request.argument,
                source=self.source,
                untrusted_target=request.target,
                asker=PendingAsker(self.paths, ask_timeout()),
            )
        except Exception as exc:  # no decision is a deny
            raise CallRefused("denied by policy", "deny", f"no decision: {exc}") from None

    def _running_target(self, target: str, autostart: bool) -> dict[str, Any]:
        """The target's state; started first when the decision allows it."""
        from qnix.errors import QnixError
        from qnix.runtime import lifecycle

        state = quickrun.running_state(self.paths, target)
        if state is not None:
            return state
        if not autostart:
            raise CallRefused("the target is not running", reason="autostart=no")
        try:
            lifecycle.start(self.paths, target)
        except QnixError as exc:
            raise CallRefused("the target could not be started", reason=exc.message) from None
        state = quickrun.running_state(self.paths, target)
        if state is None:
            raise CallRefused("the target could not be started", reason="stopped at once")
        return state

    def _call(
        self, conn: socket.socket, request: CallRequest, fds: Sequence[int], outcome: CallOutcome
    ) -> int:
        """Decide, then run the handler in the target: its exit code, or CallRefused."""
        if service_argv(request.service, "python3") is None:
            raise CallRefused("unknown service", reason=f"no handler for {request.service}")
        decision = self._decide(request)
        outcome.resolved_target = decision.target
        if decision.action != "allow" or decision.target is None:
            # The reason (policy lines, other compartments' names) stays in the audit log.
            raise CallRefused("denied by policy", "deny", decision.reason)
        target = decision.target
        if target == HOST_TARGET:
            raise CallRefused(
                "calls to the host are not served",
                "deny",
                f"allowed to {target}, which this broker does not serve",
            )
        if target.startswith(DISPVM_PREFIX):
            return self._call_disposable(conn, request, fds, outcome, target)
        state = self._running_target(target, decision.autostart)
        return self._run_service(conn, request, fds, target, state)

    def _call_disposable(
        self,
        conn: socket.socket,
        request: CallRequest,
        fds: Sequence[int],
        outcome: CallOutcome,
        target: str,
    ) -> int:
        """The service in a disposable of its own (Qubes' @dispvm:T), gone once it ends."""
        from qnix.errors import QnixError
        from qnix.runtime import disposables

        template = target.removeprefix(DISPVM_PREFIX)
        try:
            with disposables.new_disposable(self.paths, template) as (config, state):
                outcome.disposable = config.name
                return self._run_service(conn, request, fds, config.name, state)
        except QnixError as exc:
            raise CallRefused("the disposable could not be started", reason=exc.message) from None

    def _run_service(
        self,
        conn: socket.socket,
        request: CallRequest,
        fds: Sequence[int],
        target: str,
        state: dict[str, Any],
    ) -> int:
        """Run the service's program in running compartment `target` with the caller's stdio."""
        argv = service_argv(request.service, _interpreter_of(self.paths, target))
        assert argv is not None
        env = quickrun.command_env(state, stdin_is_tty=False)
        env |= {
            "QNIX_REMOTE_DOMAIN": self.source,
            "QNIX_SERVICE": request.service,
            "QNIX_SERVICE_ARGUMENT": request.argument,
        }
        self._reply(conn, {"op": "started"})
        try:
            return agent.execute(
                str(self.paths.agent_socket(target)),
                argv,
                env=env,
                cwd=state["cwd"],
                stdio=fds,
                peer_uid=state["host_uid"],
            )
        except (agent.AgentError, agent.ProtocolError) as exc:
            raise CallRefused("the target did not run the service", reason=str(exc)) from None


def serve_in_background(
    listener: socket.socket, paths: RuntimePaths, source: str, host_uid: int
) -> threading.Thread:
    """The keeper's call server, in a daemon thread that ends with the keeper."""
    server = CallServer(paths, source, host_uid, listener)
    thread = threading.Thread(target=server.serve_forever, name="qnix-calls", daemon=True)
    thread.start()
    return thread
