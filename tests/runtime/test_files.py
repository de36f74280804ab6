"""atomic_write: the file is there whole or not at all, and a writer killed part-way leaves
no temporary file beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from qnix.runtime.files import atomic_write, replace_tree, temporaries_of, tree_leftovers

KILLS = 20
WRITER = """\
import sys
from pathlib import Path
from qnix.runtime.files import atomic_write
target, data = Path(sys.argv[1]), b"x" * (1 << 20)
print("ready", flush=True)
while True:
    atomic_write(target, data, 0o600)
"""


def test_the_file_is_replaced_whole_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "applied.json"
    atomic_write(target, b"first", 0o600)
    atomic_write(target, b"second", 0o640)
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["applied.json"]


def test_a_writer_killed_part_way_leaves_at_most_its_temporary_name(tmp_path: Path) -> None:
    """Killed while it writes, nothing is left (the file is unnamed until then); killed in the
    instant between naming it and the rename, its temporary name, which `temporaries_of`
    finds (and `qnix down` removes). The file itself is always whole or absent."""
    target = tmp_path / "applied.json"
    for _ in range(KILLS):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        writer.send_signal(signal.SIGKILL)  # somewhere in a write, or between two
        writer.wait(timeout=30)
        writer.stdout.close()
        left = {path.name for path in temporaries_of(target)}
        assert set(os.listdir(tmp_path)) - left in (set(), {"applied.json"})
        for name in left:
            (tmp_path / name).unlink()
        if target.exists():
            assert target.read_bytes() == b"x" * (1 << 20)


def test_a_tree_replacement_killed_halfway_is_cleared_by_the_next(tmp_path: Path) -> None:
    """What a killed replace_tree leaves beside the target (its new tree half-written, or the
    old one not yet removed) is removed by the next replacement; the control: without a
    replacement both stay, and `tree_leftovers` names them (`qnix down` removes them)."""
    target = tmp_path / "generation"
    replace_tree(target, {"a": b"1"})
    (tmp_path / ".generation.new-abc").mkdir()
    (tmp_path / ".generation.old-4242").mkdir()
    (tmp_path / ".generation.old-4242" / "a").write_bytes(b"0")
    assert [p.name for p in tree_leftovers(target)] == [
        ".generation.new-abc",
        ".generation.old-4242",
    ]
    replace_tree(target, {"a": b"2"})
    assert sorted(os.listdir(tmp_path)) == ["generation"]
    assert (target / "a").read_bytes() == b"2"
