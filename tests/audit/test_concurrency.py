"""Several writers at once, and writers killed mid-append: the chain stays whole, and every
entry a writer was told is written is in it."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from qnix.audit import events
from qnix.audit.verify import verify

WRITER = """\
import sys
from pathlib import Path
from qnix.audit import events

log, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.read()  # starts when the test closes stdin: all writers at once
index = 0
while count < 0 or index < count:
    seq = events.append(log, "call", {"writer": name, "index": index, "pad": "x" * 3000})
    print(seq, index, flush=True)
    index += 1
"""


def start_writer(log: Path, name: str, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log), name, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def output(process: subprocess.Popen[str]) -> list[str]:
    """The writer's complete lines: one killed while printing leaves a part of a line, which
    acknowledges nothing."""
    assert process.stdout is not None
    with process.stdout:
        return process.stdout.read().split("\n")[:-1]


def logged(log: Path) -> list[events.Entry]:
    return [events.decode(line) for line in events.split_lines(log.read_bytes())]


def test_concurrent_writers_make_one_chain_with_every_entry(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "events.jsonl"
    writers, each = 4, 40
    processes = [start_writer(log, f"w{number}", each) for number in range(writers)]
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
    acknowledged = {}
    for number, process in enumerate(processes):
        assert process.wait(timeout=120) == 0
        for row in output(process):
            seq, index = map(int, row.split())
            acknowledged[seq] = (f"w{number}", index)
    result = verify(log)
    assert (result.ok, result.entries, result.notes) == (True, writers * each, ())
    entries = logged(log)
    assert [entry.seq for entry in entries] == list(range(1, writers * each + 1))
    assert {e.seq: (e.fields["writer"], e.fields["index"]) for e in entries} == acknowledged
    assert sorted(acknowledged.values()) == sorted(
        (f"w{number}", index) for number in range(writers) for index in range(each)
    )


def test_a_writer_killed_anywhere_leaves_a_verifiable_log(tmp_path: Path) -> None:
    """SIGKILL at random moments of an endless append loop (between the write, the fsync,
    the head's temporary file and its rename): after each kill the log verifies, every entry
    the writer reported is there as reported, and the next writer carries on."""
    log = tmp_path / "audit" / "events.jsonl"
    rng = random.Random(5424)
    acknowledged: dict[int, tuple[str, int]] = {}
    for round_number in range(30):
        name = f"k{round_number}"
        process = start_writer(log, name, -1)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        for row in output(process):
            seq, index = map(int, row.split())
            acknowledged[seq] = (name, index)
        result = verify(log)
        assert result.ok, str(result.problem)
    events.append(log, "stop", {"writer": "last"})
    result = verify(log)
    assert result.ok and not [note for note in result.notes if "head" in note]
    kept = {
        entry.seq: (entry.fields.get("writer"), entry.fields.get("index")) for entry in logged(log)
    }
    assert {seq: kept[seq] for seq in acknowledged} == acknowledged
    assert [entry.seq for entry in logged(log)] == list(range(1, result.entries + 1))
    assert logged(log)[-1].fields == {"writer": "last"}
