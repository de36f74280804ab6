"""The broker's waits on agents, with a stand-in agent on a socket pair: a deadline ends each
one, and a pipe something else holds open is read only for what it has."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from qnix.broker.programs import (
    ENV_TRANSFER_TIMEOUT,
    TRANSFER_TIMEOUT,
    Drain,
    Feed,
    Started,
    transfer_timeout,
    wait_all,
)
from qnix.errors import QnixError
from qnix.runtime import agent


@pytest.fixture
def agent_end() -> Iterator[tuple[Started, socket.socket]]:
    """A started command and the agent's end of its connection."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        yield Started(ours, "target"), theirs
    ours.close()


def soon() -> float:
    return time.monotonic() + 0.2


def test_the_exit_code_as_reported(agent_end: tuple[Started, socket.socket]) -> None:
    started, theirs = agent_end
    agent.send_message(theirs, {"op": "started", "pid": 7})
    agent.send_message(theirs, {"op": "exited", "code": 3})
    assert wait_all([started], (), soon()) == [3]
    assert started.sock.fileno() == -1  # closed: the agent ends what still runs


def test_an_agent_that_never_reports_the_end_is_given_up(
    agent_end: tuple[Started, socket.socket],
) -> None:
    started, theirs = agent_end
    agent.send_message(theirs, {"op": "started", "pid": 7})
    assert wait_all([started], (), soon()) == [None]
    assert theirs.recv(1) == b""  # the host closed its side


def test_a_message_trickled_in_is_refused(agent_end: tuple[Started, socket.socket]) -> None:
    started, theirs = agent_end
    theirs.sendall(b"\0\0\0\x30{")
    with pytest.raises(QnixError, match="target: the agent sent half a message"):
        wait_all([started], (), soon())


def test_once_one_command_ended_the_others_get_the_finish_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("qnix.broker.programs.FINISH_TIMEOUT", 0.1)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        agent.send_message(pairs[0][1], {"op": "exited", "code": 0})
        far = time.monotonic() + 600  # the test would hang if only this counted
        assert wait_all([Started(pairs[0][0], "a"), Started(pairs[1][0], "b")], (), far) == [
            0,
            None,
        ]
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def test_an_output_pipe_held_open_is_read_for_what_it_has(
    agent_end: tuple[Started, socket.socket],
) -> None:
    """The program wrote and ended, something else keeps the pipe's write end: what was
    written comes back, nothing waits for the pipe's end."""
    started, theirs = agent_end
    read_fd, held = os.pipe()
    try:
        os.write(held, b"summary")
        drain = Drain(read_fd, cap=4)
        agent.send_message(theirs, {"op": "exited", "code": 0})
        assert wait_all([started], [drain], soon()) == [0]
        os.write(held, b"!")
        assert drain.result() == b"summ"
        assert drain.overflow
        assert drain.fd == -1
    finally:
        os.close(held)


def test_input_nobody_reads_does_not_block(agent_end: tuple[Started, socket.socket]) -> None:
    started, _ = agent_end
    read_fd, write_fd = os.pipe()
    try:
        feed = Feed(write_fd, memoryview(b"x" * (4 << 20)))  # more than a pipe holds
        assert wait_all([started], [feed], soon()) == [None]
        assert feed.data  # still to write when the deadline passed
        feed.close()
    finally:
        os.close(read_fd)


def test_the_transfer_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TRANSFER_TIMEOUT, raising=False)
    assert transfer_timeout() == TRANSFER_TIMEOUT
    monkeypatch.setenv(ENV_TRANSFER_TIMEOUT, "2.5")
    assert transfer_timeout() == 2.5
    for bad in ("soon", "0", "-1", "nan", "inf"):
        monkeypatch.setenv(ENV_TRANSFER_TIMEOUT, bad)
        with pytest.raises(QnixError, match=f"QNIX_TRANSFER_TIMEOUT={bad} is not a number"):
            transfer_timeout()
