"""The office example used as an admin would: a copy the command names the target of, and the
terminal's question."""

from __future__ import annotations

import os
import pty
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tests.runtime.livehost import QNIX, LiveHost

OFFICE = EXAMPLES / "smb-office.toml"
DEMO_KEY = EXAMPLES / "keys" / "demo-only.agekey"


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    os.environ["QNIX_AGE_IDENTITY"] = str(DEMO_KEY)  # LiveHost's commands take os.environ
    try:
        made.ok("apply", str(OFFICE))
        made.ok("run", "work", "--", "sh", "-c", "printf 'Q3 numbers' > ~/report.txt")
        yield made
    finally:
        del os.environ["QNIX_AGE_IDENTITY"]
        made.close()


def incoming(host: LiveHost, name: str) -> Path:
    return host.paths.home(name) / "QubesIncoming" / "work"


def test_copy_yes_takes_the_target_the_command_names(host: LiveHost) -> None:
    result = host.qnix("copy", "work:report.txt", "personal", "--yes")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "copied 1 file, 0 folders, 0 symlinks (10 bytes) from work to "
        "personal:~/QubesIncoming/work/\n",
        "",
    )
    assert (incoming(host, "personal") / "report.txt").read_bytes() == b"Q3 numbers"
    # Only the named target: banking, also on offer, got nothing.
    assert not incoming(host, "banking").exists()
    # --no still denies the same question.
    denied = host.qnix("copy", "work:report.txt", "banking", "--no")
    assert (denied.returncode, denied.stderr.splitlines()[0]) == (
        1,
        "error: copy from work to banking denied: not confirmed (30-office.policy:5)",
    )
    assert not incoming(host, "banking").exists()


def test_the_terminal_question_preselects_the_named_target(host: LiveHost) -> None:
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, as an admin's shell is
        os.execve(QNIX, [QNIX, "copy", "work:report.txt", "banking"], host.env)
    said = b""
    try:
        while not said.endswith(b"): "):
            assert select.select([terminal], [], [], 60)[0], said
            said += os.read(terminal, 4096)
        os.write(terminal, b"\n")  # Enter: the preselected target
        while True:
            if not select.select([terminal], [], [], 60)[0]:
                break
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            said += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, said
    assert said.decode() == (
        "qnix: work asks for qnix.Filecopy. Allow? Targets: banking, personal, vault\r\n"
        "  target [banking] or 'no' (denied after 60 s): \r\n"
        "copied 1 file, 0 folders, 0 symlinks (10 bytes) from work to "
        "banking:~/QubesIncoming/work/\r\n"
    )
    assert (incoming(host, "banking") / "report.txt").read_bytes() == b"Q3 numbers"
