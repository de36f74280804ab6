"""The agent protocol: commands run with our stdio, hostile messages end the conversation."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.runtime import agent

AGENT = Path(agent.__file__)


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "agent.sock")
    with agent.bound_socket(path) as bound:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(AGENT), "serve", str(bound.fileno())],
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(bound.fileno(),),
        )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    try:
        yield path
    finally:
        proc.kill()
        proc.wait()


def run_captured(path: str, argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    os.write(w_in, stdin)
    os.close(w_in)
    try:
        code = agent.execute(path, argv, env={"PATH": "/usr/bin:/bin"}, stdio=(r_in, w_out, w_err))
    finally:
        for fd in (r_in, w_out, w_err):
            os.close(fd)
    with os.fdopen(r_out, "rb") as out, os.fdopen(r_err, "rb") as err:
        return code, out.read(), err.read()


def test_ping(agent_socket: str) -> None:
    assert agent.ping(agent_socket) > 0


def test_exec_passes_stdio_and_exit_code(agent_socket: str) -> None:
    code, out, err = run_captured(
        agent_socket, ["sh", "-c", "read x; echo got:$x; echo oops >&2; exit 3"], b"hello\n"
    )
    assert (code, out, err) == (3, b"got:hello\n", b"oops\n")


def test_signal_death_is_128_plus_signal(agent_socket: str) -> None:
    code, _, _ = run_captured(agent_socket, ["sh", "-c", "kill -9 $$"])
    assert code == 128 + 9


def test_missing_command_is_127(agent_socket: str) -> None:
    code, _, err = run_captured(agent_socket, ["no-such-command-qnix"])
    assert code == 127
    assert b"command not found" in err


def test_environment_is_exactly_what_was_sent(agent_socket: str) -> None:
    code, out, _ = run_captured(agent_socket, ["/usr/bin/env"])
    assert code == 0
    assert out == b"PATH=/usr/bin:/bin\n"


def _raw(path: str, payload: bytes, fds: list[int] | None = None) -> dict[str, object] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        if fds:
            sock.sendmsg(
                [payload],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))],
            )
        else:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            message, received = agent.recv_message(sock)
        except agent.ProtocolError:
            return None
        for fd in received:
            os.close(fd)
        return message


def _frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


HOSTILE = {
    "oversized length": struct.pack(">I", 2**31) + b"x" * 16,
    "not json": struct.pack(">I", 5) + b"\xff\xfe{}x",
    "json list": _frame([1, 2]),
    "no op": _frame({"argv": ["true"]}),
    "unknown op": _frame({"op": "format-disk"}),
    "exec without fds": _frame({"op": "exec", "argv": ["true"], "env": {}}),
    "truncated": struct.pack(">I", 100) + b'{"op":',
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_messages_are_refused_and_the_agent_survives(
    agent_socket: str, payload: bytes
) -> None:
    answer = _raw(agent_socket, payload)
    assert answer is None or answer["op"] == "error"
    assert agent.ping(agent_socket) > 0


BAD_EXEC = {
    "argv empty": {"argv": []},
    "argv not strings": {"argv": ["true", 3]},
    "argv with NUL": {"argv": ["tr\x00ue"]},
    "env not strings": {"argv": ["true"], "env": {"A": 1}},
    "env key with =": {"argv": ["true"], "env": {"A=B": "c"}},
    "relative cwd": {"argv": ["true"], "cwd": "tmp"},
    "extra field": {"argv": ["true"], "uid": 0},
    "tty with descriptors": {"argv": ["true"], "tty": {"rows": 24, "cols": 80}},
    "tty not an object": {"argv": ["true"], "tty": True},
    "tty without cols": {"argv": ["true"], "tty": {"rows": 24}},
    "tty too large": {"argv": ["true"], "tty": {"rows": 24, "cols": 10**6}},
    "tty negative": {"argv": ["true"], "tty": {"rows": -1, "cols": 80}},
    "tty bool size": {"argv": ["true"], "tty": {"rows": True, "cols": 80}},
    "tty extra key": {"argv": ["true"], "tty": {"rows": 1, "cols": 1, "fd": 0}},
}


@pytest.mark.parametrize("fields", BAD_EXEC.values(), ids=BAD_EXEC.keys())
def test_malformed_exec_requests_run_nothing(
    agent_socket: str, tmp_path: Path, fields: dict[str, object]
) -> None:
    marker = tmp_path / "ran"
    argv = fields["argv"]
    assert isinstance(argv, list)
    # Were the request accepted, the command would leave a marker behind.
    fields = {
        **fields,
        "op": "exec",
        "argv": ["sh", "-c", f"touch {marker}", *argv] if argv else [],
    }
    with open(os.devnull, "rb") as null:
        fd = null.fileno()
        answer = _raw(agent_socket, _frame(fields), [fd, fd, fd])
    assert answer is not None and answer["op"] == "error"
    time.sleep(0.1)
    assert not marker.exists()


def test_too_many_descriptors_are_refused(agent_socket: str) -> None:
    with open(os.devnull, "rb") as null:
        fd = null.fileno()
        answer = _raw(agent_socket, _frame({"op": "exec", "argv": ["true"]}), [fd] * 5)
    assert answer is None or answer["op"] == "error"
    assert agent.ping(agent_socket) > 0


def test_an_agent_running_as_another_uid_is_refused(agent_socket: str, tmp_path: Path) -> None:
    """The host checks who listens (SO_PEERCRED), not only who owns the socket file."""
    marker = tmp_path / "ran"
    with pytest.raises(agent.AgentError, match="belongs to uid 0"):
        agent.execute(agent_socket, ["touch", str(marker)], env={}, peer_uid=12345)
    assert not marker.exists()
    code = agent.execute(
        agent_socket, ["touch", str(marker)], env={"PATH": "/usr/bin:/bin"}, peer_uid=os.geteuid()
    )
    assert code == 0
    assert marker.exists()


def test_on_a_terminal_the_command_gets_one_of_the_agents_own(agent_socket: str) -> None:
    """The host sends no descriptor; the agent answers with a pty master whose slave is the
    command's controlling terminal, of the size asked for."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(agent_socket)
        request = {
            "op": "exec",
            "argv": ["sh", "-c", "stty size; tty >/dev/null && echo controlling; exit 4"],
            "env": {"PATH": "/usr/bin:/bin"},
            "tty": {"rows": 33, "cols": 99},
        }
        agent.send_message(sock, request)
        started, fds = agent.recv_message(sock)
        assert started["op"] == "started" and len(fds) == 1
        master = fds[0]
        output = b""
        try:
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command closed its terminal
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(master)
        exited, _ = agent.recv_message(sock)
    assert exited == {"op": "exited", "code": 4}
    assert output.replace(b"\r", b"") == b"33 99\ncontrolling\n"


def test_a_terminal_on_our_side_is_copied_where_splice_cannot_move_it(agent_socket: str) -> None:
    """Our stdin and stdout a terminal, the command a pipe (`qnix run ... > tty` in a script):
    the kernel cannot splice to or from a terminal, so the relay reads and writes."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # no echo, no line discipline: bytes as they are
        os.write(master, b"typed\n")
        code = agent.execute(
            agent_socket,
            ["sh", "-c", "read x; echo got:$x"],
            env={"PATH": "/usr/bin:/bin"},
            stdio=(slave, slave, slave),
        )
        assert code == 0
        assert os.read(master, 100) == b"got:typed\n"
    finally:
        os.close(master)
        os.close(slave)


def _with_descriptors(sock: socket.socket, data: bytes, fd: int, count: int = 3) -> None:
    rights = array.array("i", [fd] * count)
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])


def _open_devnulls() -> int:
    """How many of this process's descriptors are open on /dev/null."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            count += os.readlink(f"/proc/self/fd/{entry}") == os.devnull
    return count


def test_descriptors_of_a_message_cut_off_by_a_timeout_are_closed() -> None:
    """A peer that sends descriptors and then stalls mid-message leaves none of them open here."""
    with open(os.devnull, "rb") as null:
        before = _open_devnulls()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            header = (1000).to_bytes(agent.HEADER_SIZE, "big")
            _with_descriptors(theirs, header + b"{", null.fileno())
            ours.settimeout(0.2)
            with pytest.raises(TimeoutError):
                agent.recv_message(ours)
        assert _open_devnulls() == before
        # Control: the same descriptors with a whole message arrive, open, for the caller.
        ours, theirs = socket.socketpair()
        with ours, theirs:
            body = b'{"op": "x"}'
            whole = len(body).to_bytes(agent.HEADER_SIZE, "big") + body
            _with_descriptors(theirs, whole, null.fileno())
            message, fds = agent.recv_message(ours)
        assert message == {"op": "x"}
        assert _open_devnulls() == before + 3
        for fd in fds:
            os.close(fd)
