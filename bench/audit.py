"""How fast the hash-chained audit log appends and verifies, beside a raw baseline in one run.

  * appends per second, each fsynced before it returns: one writer, then 4 writer processes at
    once on the same log; beside each, the raw baseline: the same lines with a plain
    open(O_APPEND) + write + fsync + close (what the log did before it was chained: no lock,
    no head, no hash);
  * verify: entries per second of `qnix.audit.verify.verify` on a 100,000-entry log (read,
    check, hash every line, compare with the head); beside it the floor of any chain check:
    reading the file and hashing each line with SHA-256.

Each figure is the best of a few rounds (the machine may be shared). The files live in a
temporary folder under /var/tmp (a disk, so fsync means something; /tmp may be memory), removed
at the end. Run it with `python bench/audit.py`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qnix.audit import events
from qnix.audit.verify import verify

APPENDS = 200  # per writer and round
WRITERS = 4
VERIFY_ENTRIES = 100_000
ROUNDS = 3
FIELDS: dict[str, events.FieldValue] = {
    "compartment": "work",
    "argv": ["sh", "-c", "echo hello"],
    "result": 0,
}

WRITER = """\
import os, sys
from pathlib import Path
from qnix.audit import events
log, count, raw = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "raw"
fields = {"compartment": "work", "argv": ["sh", "-c", "echo hello"], "result": 0}
line = events.encode(1, events.now(), "run", fields, events.GENESIS)
sys.stdin.read()  # all writers start together when stdin closes
for _ in range(count):
    if raw:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.write(fd, line)
        os.fsync(fd)
        os.close(fd)
    else:
        events.append(log, "run", fields)
"""


def raw_append(log: Path, line: bytes) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def best_rate(count: int, run: Callable[[int], None]) -> float:
    """The best of ROUNDS rounds, in operations per second; `run(round)` does `count` of them."""
    rates = []
    for round_number in range(ROUNDS):
        start = time.perf_counter()
        run(round_number)
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def single_writer(base: Path, raw: bool) -> float:
    line = events.encode(1, events.now(), "run", FIELDS, events.GENESIS)

    def run(round_number: int) -> None:
        log = base / f"single-{'raw' if raw else 'chain'}-{round_number}" / "events.jsonl"
        log.parent.mkdir()
        for _ in range(APPENDS):
            if raw:
                raw_append(log, line)
            else:
                events.append(log, "run", FIELDS)

    return best_rate(APPENDS, run)


def concurrent_writers(base: Path, raw: bool) -> float:
    """Appends per second of WRITERS processes appending at once (their start not timed)."""
    rates = []
    for round_number in range(ROUNDS):
        log = base / f"many-{'raw' if raw else 'chain'}-{round_number}" / "events.jsonl"
        log.parent.mkdir()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(log), str(APPENDS), "raw" if raw else "chain"],
                stdin=subprocess.PIPE,
            )
            for _ in range(WRITERS)
        ]
        time.sleep(1)  # let every writer import and block on its stdin
        start = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.close()
        for process in processes:
            if process.wait() != 0:
                raise RuntimeError("a writer failed")
        rates.append(WRITERS * APPENDS / (time.perf_counter() - start))
        if not raw:
            result = verify(log)
            if not result.ok or result.entries != WRITERS * APPENDS:
                raise RuntimeError(f"concurrent writers broke the chain: {result}")
    return max(rates)


def large_log(base: Path) -> Path:
    """A VERIFY_ENTRIES-entry log with its head, in the writer's encoding (written at once:
    appending them one by one, fsynced, is what the rows above measure)."""
    log = base / "large" / "events.jsonl"
    log.parent.mkdir()
    prev, lines = events.GENESIS, []
    for seq in range(1, VERIFY_ENTRIES + 1):
        line = events.encode(seq, events.now(), "run", {**FIELDS, "result": seq}, prev)
        prev = events.line_hash(line)
        lines.append(line)
    data = b"".join(lines)
    log.write_bytes(data)
    events.head_path(log).write_bytes(events.Head(VERIFY_ENTRIES, prev, len(data)).encode())
    return log


def verify_rate(log: Path) -> float:
    def run(_: int) -> None:
        result = verify(log)
        if not (result.ok and result.entries == VERIFY_ENTRIES):
            raise RuntimeError(f"the large log does not verify: {result}")

    return best_rate(VERIFY_ENTRIES, run)


def hash_floor_rate(log: Path) -> float:
    def run(_: int) -> None:
        for line in log.read_bytes().split(b"\n")[:-1]:
            hashlib.sha256(line + b"\n").hexdigest()

    return best_rate(VERIFY_ENTRIES, run)


def file_system(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts (longest mount prefix)."""
    best, kind = "", "unknown"
    for row in Path("/proc/mounts").read_text().splitlines():
        _, mount_point, fs_type, *_ = row.split()
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, kind = mount_point, fs_type
    return kind


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="qnixbench-audit-", dir="/var/tmp"))
    try:
        rows = [
            ("1 writer, appends/s", single_writer(base, False), single_writer(base, True)),
            (
                f"{WRITERS} writers, appends/s",
                concurrent_writers(base, False),
                concurrent_writers(base, True),
            ),
        ]
        log = large_log(base)
        rows.append(
            (
                f"verify {VERIFY_ENTRIES:,} entries, entries/s",
                verify_rate(log),
                hash_floor_rate(log),
            )
        )
        fs_type = file_system(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"audit log on {fs_type}, best of {ROUNDS} rounds, {APPENDS} appends per writer, "
        f"{os.cpu_count()} CPUs; every append fsynced"
    )
    print(f"  {'':<34}  {'qnix chain':>12}  {'raw baseline':>12}  {'ratio':>6}")
    for label, chained, raw in rows:
        print(f"  {label:<34}  {chained:>12,.0f}  {raw:>12,.0f}  {chained / raw:>6.2f}")
    print(
        "  raw baseline: appends: open(O_APPEND) + write + fsync + close of the same line; "
        "verify: read + SHA-256 of every line"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
