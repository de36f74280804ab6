"""`qnix run` on a terminal: the command gets a terminal of the compartment's own (job control,
^C, the window size) and our terminal's descriptor never enters the compartment."""

from __future__ import annotations

import os
import select
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest

from qnix.runtime import cgroups
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
[host]
hostname = "term"
subnet = "10.215.0.0/16"

[compartments.work]
network = "none"
autostart = true
memory_mb = 128
"""
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        live.ok("apply", str(live.spec(SPEC)))
        yield live
    finally:
        live.close()


class Terminal:
    """A pseudo-terminal on the host, standing for the admin's: `qnix run` gets its slave as
    stdin, stdout and stderr; the test types into and reads from the master."""

    def __init__(self, rows: int = 33, cols: int = 99) -> None:
        self.master, self.slave = os.openpty()
        termios.tcsetwinsize(self.slave, (rows, cols))
        self.output = b""

    def run(self, host: LiveHost, *command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [QNIX, "run", "work", "--", *command],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env={**host.env, "TERM": "xterm-qnix"},
        )

    def read_until(self, text: bytes, timeout: float = TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} in {self.output!r}"
            if select.select([self.master], [], [], remaining)[0]:
                self.output += os.read(self.master, 4096)
        return self.output.replace(b"\r", b"")

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    made = Terminal()
    try:
        yield made
    finally:
        made.close()


def test_the_command_gets_a_terminal_of_our_size(host: LiveHost, terminal: Terminal) -> None:
    before = termios.tcgetattr(terminal.slave)
    process = terminal.run(host, "sh", "-c", "stty size; echo term=$TERM; tty; exit 3")
    assert process.wait(timeout=TIMEOUT) == 3
    shown = terminal.read_until(b"/dev/pts/").decode()
    assert "33 99\nterm=xterm-qnix\n/dev/pts/" in shown
    assert termios.tcgetattr(terminal.slave) == before  # raw mode undone


def test_control_c_interrupts_the_command_inside(host: LiveHost, terminal: Terminal) -> None:
    # `exec`: a ^C that lands while dash forks a foreground command can be lost in dash
    # itself; what is tested here is that the compartment's terminal turns ^C into SIGINT.
    process = terminal.run(host, "sh", "-c", "echo ready; exec sleep 60")
    terminal.read_until(b"ready")
    os.write(terminal.master, b"\x03")  # ^C, delivered by the compartment's terminal
    assert process.wait(timeout=TIMEOUT) == 130


def test_an_interactive_shell_has_job_control(host: LiveHost, terminal: Terminal) -> None:
    process = terminal.run(host, "bash", "--norc", "--noprofile", "-i")
    terminal.read_until(b"$ ")  # the prompt
    os.write(terminal.master, b"sleep 30 &\njobs\nkill %1; wait; echo jobs-done\nexit 6\n")
    assert process.wait(timeout=TIMEOUT) == 6
    shown = terminal.read_until(b"jobs-done")
    assert b"no job control" not in shown
    assert b"Running" in shown and b"sleep 30" in shown


def test_our_terminal_never_enters_the_compartment(host: LiveHost, terminal: Terminal) -> None:
    ours = f"/proc/self/fd/{terminal.slave}"
    process = terminal.run(host, "sh", "-c", "echo ready; sleep 60")
    try:
        terminal.read_until(b"ready")
        cgroup = cgroups.cgroup_of(f"{host.prefix}work", cgroups.detect())
        pids = cgroups.processes(cgroup)
        assert len(pids) >= 3  # the agent, its connection handler, sh, sleep
        held = set()  # by device and inode: a compartment's /dev/pts/1 is another terminal
        for pid in pids:
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                try:
                    info = os.stat(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                held.add((info.st_dev, info.st_ino))
        info = os.stat(ours)
        assert (info.st_dev, info.st_ino) not in held
        # The control: the qnix process on the host does hold it.
        qnix_side = os.stat(f"/proc/{process.pid}/fd/0")
        assert (qnix_side.st_dev, qnix_side.st_ino) == (info.st_dev, info.st_ino)
    finally:
        process.kill()
        process.wait()
