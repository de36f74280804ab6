"""`qnix audit show|verify|export` through the installed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qnix.audit import events
from qnix.audit.rfc5424 import parse_message
from qnix.runtime.paths import RuntimePaths

QNIX = str(Path(sys.executable).with_name("qnix"))


def qnix(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QNIX, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state root whose log has five entries about two compartments."""
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    events.record(paths, "start", compartment="work", result="ok")
    events.record(paths, "run", compartment="work", argv=["sh", "-c", "printf '\x1b[2J'"], result=0)
    events.record(paths, "start", compartment="vault", result="ok")
    events.record(paths, "copy", compartment="work", target="vault", file="a b.txt")
    events.record(paths, "stop", compartment="work", result="ok")
    return paths.state_root


def log_of(state: Path) -> Path:
    return state / "audit" / "events.jsonl"


def test_verify_exits_0_on_an_intact_log(state: Path) -> None:
    result = qnix("audit", "verify", "--state-root", str(state))
    head = events.read_head(events.head_path(log_of(state)))
    assert isinstance(head, events.Head)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{log_of(state)}: intact, 5 entries, head 5 {head.hash[:16]}\n"


def test_verify_exits_1_naming_the_first_bad_entry(state: Path) -> None:
    log = log_of(state)
    lines = events.split_lines(log.read_bytes())
    lines[2] = lines[2].replace(b'"vault"', b'"vaulT"')
    log.write_bytes(b"".join(lines))
    result = qnix("audit", "verify", "--state-root", str(state))
    assert result.returncode == 1
    assert result.stdout == (
        f"{log}: NOT intact: first bad entry entry 3 (line 3): modified: its hash is not the "
        "prev of entry 4, which the rest of the chain links to\n"
    )
    as_json = json.loads(qnix("audit", "verify", "--state-root", str(state), "--json").stdout)
    assert as_json["ok"] is False
    assert as_json["problem"] == {
        "line": 3,
        "seq": 3,
        "kind": "modified",
        "reason": "its hash is not the prev of entry 4, which the rest of the chain links to",
    }


def test_verify_exits_1_on_a_cut_log_and_takes_the_state_root_from_the_environment(
    state: Path,
) -> None:
    log = log_of(state)
    log.write_bytes(b"".join(events.split_lines(log.read_bytes())[:3]))
    result = qnix("audit", "verify", env={**os.environ, "QNIX_STATE_ROOT": str(state)})
    assert result.returncode == 1
    assert "first bad entry entry 4 (line 4): truncated: entries 4-5 of the head's 5" in (
        result.stdout
    )


def test_verify_of_an_empty_state_root(tmp_path: Path) -> None:
    result = qnix("audit", "verify", "--state-root", str(tmp_path))
    assert (result.returncode, result.stdout) == (
        0,
        f"{tmp_path}/audit/events.jsonl: no entries yet\n",
    )
    missing = qnix("audit", "verify", "--log", str(tmp_path / "nope.jsonl"))
    assert (missing.returncode, missing.stderr) == (
        1,
        f"error: {tmp_path}/nope.jsonl: no such audit log\n",
    )


def test_show_filters_and_escapes(state: Path) -> None:
    result = qnix("audit", "show", "--state-root", str(state), "--compartment", "work")
    assert result.returncode == 0, result.stderr
    rows = [row.split(None, 4) for row in result.stdout.splitlines()]
    assert [(row[0], row[2], row[3]) for row in rows] == [
        ("1", "start", "work"),
        ("2", "run", "work"),
        ("4", "copy", "work"),
        ("5", "stop", "work"),
    ]
    assert rows[1][4] == 'argv=["sh", "-c", "printf \'\\u001b[2J\'"] result=0'
    assert rows[2][4] == 'file="a b.txt" target=vault'
    assert "\x1b" not in result.stdout
    # An entry is about a compartment that is its source or target too.
    vault = qnix("audit", "show", "--state-root", str(state), "--compartment", "vault")
    assert [row.split()[0] for row in vault.stdout.splitlines()] == ["3", "4"]
    last = qnix("audit", "show", "--state-root", str(state), "--event", "start", "--limit", "1")
    assert [row.split()[:4] for row in last.stdout.splitlines()] == [
        ["3", last.stdout.split()[1], "start", "vault"]
    ]
    as_json = qnix("audit", "show", "--state-root", str(state), "--json", "--event", "stop")
    assert as_json.stdout.encode() == events.split_lines(log_of(state).read_bytes())[4]
    future = qnix("audit", "show", "--state-root", str(state), "--since", "2999-01-01")
    assert (future.returncode, future.stdout) == (0, "")
    recent = qnix("audit", "show", "--state-root", str(state), "--since", "1h")
    assert len(recent.stdout.splitlines()) == 5
    wrong = qnix("audit", "show", "--state-root", str(state), "--since", "yesterday")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: 'yesterday' is not a time")


def test_export_as_json_lines_is_a_verifiable_copy(state: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "events.jsonl"
    result = qnix("audit", "export", "--state-root", str(state), "-o", str(copy))
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == log_of(state).read_bytes()
    # Without its head a copy checks its chain only; with the original head it is whole.
    events.head_path(copy).write_bytes(events.head_path(log_of(state)).read_bytes())
    assert qnix("audit", "verify", "--log", str(copy)).returncode == 0


def test_export_as_rfc5424_and_verify_what_a_syslog_server_kept(
    state: Path, tmp_path: Path
) -> None:
    result = qnix(
        "audit", "export", "--state-root", str(state), "--format", "rfc5424", "--hostname", "ws1"
    )
    assert result.returncode == 0, result.stderr
    lines = events.split_lines(log_of(state).read_bytes())
    messages = result.stdout.splitlines()
    for message, line in zip(messages, lines, strict=True):
        entry = events.decode(line)
        assert message == f"<109>1 {entry.time} ws1 qnix - audit - {line.decode().rstrip()}"
        assert parse_message(message).msg.encode() + b"\n" == line
    received = tmp_path / "received.log"
    received.write_text(result.stdout)
    verified = qnix("audit", "verify", "--log", str(received), "--format", "rfc5424")
    assert (verified.returncode, verified.stdout) == (
        0,
        f"{received}: intact, 5 entries\n"
        "note: the head was not checked: entries cut off the end cannot be seen\n",
    )
    # A relay that crashed sends what it had not marked done again: exact repeats are skipped.
    received.write_text("\n".join([*messages[:3], *messages[1:]]) + "\n")
    repeated = qnix("audit", "verify", "--log", str(received), "--format", "rfc5424")
    assert (repeated.returncode, repeated.stdout.splitlines()[-1]) == (
        0,
        "note: 2 repeated messages skipped (sent again by a relay)",
    )
    received.write_text("\n".join(messages[:1] + messages[2:]) + "\n")
    gap = qnix("audit", "verify", "--log", str(received), "--format", "rfc5424")
    assert gap.returncode == 1
    assert "first bad entry entry 2 (line 2): deleted: entry 2 is missing" in gap.stdout
