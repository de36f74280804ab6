"""The office example used as an admin would: a copy the command names the target of, the
terminal's question, and `qnix down` from a shell without the host's age identity."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, need
from tests.runtime.livehost import QNIX, LiveHost

OFFICE = EXAMPLES / "smb-office.toml"
DEMO_KEY = EXAMPLES / "keys" / "demo-only.agekey"
NO_KEY = "/nonexistent/host.agekey"


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


def _stop_all_without_the_identity(host: LiveHost) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QNIX, "down"],
        capture_output=True,
        text=True,
        env={**host.env, "QNIX_AGE_IDENTITY": NO_KEY},
        timeout=120,
        check=False,
    )


def test_down_without_the_identity_still_snapshots(host: LiveHost) -> None:
    snapshots = host.paths.state_dir("work") / "snapshots"
    before = set(snapshots.glob("*.tar.age")) if snapshots.exists() else set()
    # The control: without the recorded recipient, a stop cannot encrypt the snapshot.
    host.ok("run", "work", "--", "true")
    host.paths.recipient_file.unlink()
    failed = _stop_all_without_the_identity(host)
    assert failed.returncode == 0
    assert (
        "work: stopped, but its state could not be snapshotted: no age identity at "
        f"{NO_KEY}" in failed.stderr
    )
    assert (set(snapshots.glob("*.tar.age")) if snapshots.exists() else set()) == before

    # apply records the host's recipient while the identity is at hand; then a `down`
    # without it snapshots to that recipient, and the identity opens the snapshot.
    applied = host.ok("apply", str(OFFICE))
    assert f"host's age recipient {host.paths.recipient_file}" in applied
    public = subprocess.run(
        [need("age-keygen"), "-y", str(DEMO_KEY)], capture_output=True, text=True, check=True
    ).stdout
    assert host.paths.recipient_file.read_text() == public
    assert oct(host.paths.recipient_file.stat().st_mode & 0o777) == "0o644"
    host.ok("run", "work", "--", "true")
    done = _stop_all_without_the_identity(host)
    assert done.returncode == 0, done.stderr
    assert "work: stopped\n" in done.stdout
    assert "snapshotted" not in done.stderr
    (taken,) = set(snapshots.glob("*.tar.age")) - before
    plaintext = subprocess.run(
        [need("age"), "--decrypt", "--identity", str(DEMO_KEY), str(taken)],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(plaintext)) as archive:
        assert "report.txt" in archive.getnames()
