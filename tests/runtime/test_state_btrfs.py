"""State on btrfs: the home is a subvolume and every snapshot a read-only btrfs snapshot.

A stand-in host (tests/runtime/livehost.py) whose state root is a real btrfs file system on a
loop device, driven through the installed `qnix`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.runtime import archives, btrfs, state
from qnix.runtime.snapshots import SnapshotStore
from tests.conftest import need
from tests.runtime.test_state import (
    CHANGE,
    SPEC,
    WRITE,
    Live,
    host_key,
    make_tree,
    tool_processes_of,
    tree,
)

__all__ = ["host_key"]  # a fixture this module uses


def subvolumes(root: Path) -> list[str]:
    """Paths of the subvolumes btrfs itself lists under the file system at `root`."""
    listed = subprocess.run(
        [need("btrfs"), "subvolume", "list", "-o", str(root)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(line.split(" path ", 1)[1] for line in listed.splitlines())


def snapshot_folders(live: Live, name: str = "work") -> list[Path]:
    folder = live.paths.state_dir(name) / "snapshots"
    return sorted(folder.glob("*.snap"))


@pytest.fixture(scope="module")
def live(host_key: Path) -> Iterator[Live]:
    made = Live(host_key)
    try:
        made.state_on_btrfs()
        made.ok("apply", str(made.spec(SPEC.format(keep=3))))
        yield made
        made.qnix("stop", "work")
    finally:
        made.close()


def test_the_home_is_a_subvolume_and_a_stop_takes_a_read_only_btrfs_snapshot(live: Live) -> None:
    paths = live.paths
    home = paths.home("work")
    assert btrfs.is_subvolume(home)
    assert not btrfs.is_subvolume(paths.state_dir("work"))
    live.ok("run", "work", "--", "sh", "-c", WRITE.format(m="first"))
    first_tree = tree(home)
    # No host key is needed: qnix does not encrypt a btrfs snapshot itself.
    without_key = {**live.env, "QNIX_AGE_IDENTITY": "/nonexistent/host.agekey"}
    result = live.qnix("stop", "work", env=without_key)
    assert (result.returncode, result.stdout, result.stderr) == (0, "work: stopped\n", "")

    (row,) = live.listed()
    assert (row["kind"], row["size"], row["sha256"], row["latest"]) == ("btrfs", None, None, True)
    (taken,) = snapshot_folders(live)
    assert btrfs.is_subvolume(taken)
    assert row["uuid"] == btrfs.uuid(taken)
    with pytest.raises(OSError, match="Read-only file system"):
        (taken / "docs" / "new").write_text("x")
    assert tree(taken) == first_tree
    recorded = live.audit("snapshot")[-1]
    assert {k: recorded.get(k) for k in ("kind", "uuid", "sha256", "result")} == {
        "kind": "btrfs",
        "uuid": row["uuid"],
        "sha256": None,
        "result": "ok",
    }
    table = live.ok("state", "ls", "work").splitlines()
    assert table[0].split() == ["ID", "TIME", "REASON", "KIND", "SIZE", "SHA256/UUID", "STATUS"]
    assert table[1].split()[3:] == ["btrfs", "-", str(row["uuid"]), "latest"]


def test_a_running_compartment_is_snapshotted_diffed_and_restored(live: Live) -> None:
    paths = live.paths
    home = paths.home("work")
    live.ok("run", "work", "--", "sh", "-c", f"rm -rf ./* && {WRITE.format(m='second')}")
    live.ok("stop", "work")
    before_change = tree(home)
    before_id = live.listed()[-1]["id"]
    live.ok("run", "work", "--", "sh", "-c", CHANGE)
    taken = live.ok("state", "snapshot", "work", "--force")
    assert taken.startswith(f"work: snapshot {before_id + 1} (btrfs snapshot, ")  # type: ignore[operator]
    changed = tree(home)
    live.ok("stop", "work")

    expected = (
        "added   added\nremoved blob\nchanged docs/deep/note.txt\nchanged hard\n"
        "changed rel-link\nchanged run.sh\n"
    )
    assert live.ok("state", "diff", "work", str(before_id), str(before_id + 1)) == expected
    assert live.ok("state", "diff", "work") == "no differences\n"

    restored = live.ok("state", "restore", "work", str(before_id))
    assert restored.startswith(f"work: restored snapshot {before_id} (")
    assert tree(home) == before_change
    assert btrfs.is_subvolume(home)
    (pre_restore,) = [r for r in live.listed() if r["reason"] == "pre-restore"]
    assert pre_restore["kind"] == "btrfs" and pre_restore["latest"]
    assert tree(snapshot_folders(live)[-1]) == changed
    assert not [p for p in paths.state_dir("work").iterdir() if p.name.startswith(".")]
    assert live.ok("run", "work", "--", "cat", "docs/deep/note.txt") == "note second\n"
    live.ok("stop", "work")

    # Retention removes the subvolumes themselves: btrfs lists only the kept ones.
    kept = {str(p.relative_to(paths.state_root)) for p in snapshot_folders(live)}
    assert len(kept) == 3
    assert set(subvolumes(paths.state_root)) == kept | {
        str(paths.home(n).relative_to(paths.state_root)) for n in ("work", "scratch")
    }


def test_an_age_snapshot_of_a_plain_folder_restores_into_a_subvolume(
    live: Live, tmp_path: Path
) -> None:
    # A home made before the state root moved to btrfs is a plain folder: its snapshots are
    # encrypted copies; a restore makes it a subvolume, and btrfs snapshots follow.
    paths = live.paths
    home = paths.home("work")
    plain = paths.state_dir("work") / "plain"
    plain.mkdir()
    make_tree(plain, "old")
    for entry in plain.iterdir():
        os.lchown(entry, home.stat().st_uid, home.stat().st_gid)
    store = state.store_of(paths, "work")
    copied = store.take(plain, state.recipients_of(live.key), "manual", keep=0)
    assert copied.kind == "age" and copied.path.name.endswith(".tar.age")
    btrfs.remove_tree(plain)
    assert live.ok("state", "restore", "work", str(copied.id)).startswith(
        f"work: restored snapshot {copied.id} ("
    )
    assert btrfs.is_subvolume(home)
    assert (home / "docs" / "deep" / "note.txt").read_text() == "note old\n"
    kinds = [(r["id"], r["kind"]) for r in live.listed()]
    assert (copied.id, "age") in kinds and kinds[-1][1] == "btrfs"  # the state before


TAKER = """
import sys, time
from pathlib import Path
from qnix.runtime.snapshots import SnapshotStore
store = SnapshotStore(Path(sys.argv[1]))
print("go", flush=True)
began = time.monotonic()
store.take(Path(sys.argv[2]), (), "manual", keep=3)
print(time.monotonic() - began, flush=True)
"""


def test_sigkill_during_a_btrfs_snapshot_never_shows_a_partial_one(live: Live) -> None:
    paths = live.paths
    source = paths.state_dir("scratch") / "source"
    btrfs.create(source)
    make_tree(source, "k")
    wanted = archives.tree_manifest(source)
    folder = paths.state_dir("scratch") / "kill-snapshots"
    store = SnapshotStore(folder)
    store.take(source, (), "manual", keep=3)

    def start_taker() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", TAKER, str(folder), str(source)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline() == "go\n"
        return process

    # The kills land within the snapshot itself, not in the interpreter's exit after it.
    process = start_taker()
    assert process.stdout is not None
    duration = float(process.stdout.readline())
    process.wait(timeout=60)
    process.stdout.close()
    seed = random.randrange(1 << 32)
    chance = random.Random(seed)
    outcomes = {"finished": 0, "cut": 0}
    for kill in range(30):
        before = [s.id for s in store.snapshots()]
        process = start_taker()
        time.sleep(chance.uniform(0, duration * 1.3))
        if kill % 2:
            os.killpg(process.pid, signal.SIGKILL)  # the whole snapshot, its btrfs with it
        else:
            process.kill()  # qnix alone: the btrfs it started finishes its one step by itself
        process.wait(timeout=60)
        assert process.stdout is not None
        process.stdout.close()
        deadline = time.monotonic() + 30
        while tool_processes_of(folder, "btrfs"):
            assert time.monotonic() < deadline, "a btrfs of a killed snapshot does not end"
            time.sleep(0.01)
        context = f"seed {seed}, kill {kill}, {sorted(os.listdir(folder))}"
        latest = store.latest()
        listed = store.snapshots()
        assert latest is not None and latest in listed, context
        for snapshot in listed:
            assert btrfs.is_subvolume(snapshot.path), context
            assert store.manifest(snapshot, live.key) == wanted, context
        outcomes["finished" if [s.id for s in listed] != before else "cut"] += 1
    assert outcomes["finished"] >= 1 and outcomes["cut"] >= 1, (seed, outcomes)
    store.take(source, (), "manual", keep=3)
    assert sorted(os.listdir(folder)) == sorted(
        ["latest", *(s.path.name for s in store.snapshots())]
    )
    btrfs.remove_tree(folder)
    btrfs.remove_tree(source)


def test_gc_and_purge_remove_read_only_subvolumes(live: Live) -> None:
    paths = live.paths
    home = paths.home("scratch")
    # What a snapshot killed between `btrfs subvolume snapshot` and its rename leaves.
    leftover = paths.state_dir("scratch") / "snapshots" / ".tmp-interrupted.snap"
    leftover.parent.mkdir()
    btrfs.snapshot(home, leftover, readonly=True)
    restore_left = paths.state_dir("scratch") / ".restore-interrupted"
    restore_left.mkdir()
    btrfs.snapshot(home, restore_left / "home", readonly=False)
    assert live.ok("gc").splitlines() == [
        "scratch: removed an unfinished restore (.restore-interrupted)",
        "scratch: removed an unfinished snapshot (.tmp-interrupted.snap)",
    ]
    assert not leftover.exists() and not restore_left.exists()

    live.ok("run", "scratch", "--", "true")
    live.ok("stop", "scratch")
    live.ok("state", "snapshot", "scratch")  # explicit: taken even with snapshots = 0
    assert len(snapshot_folders(live, "scratch")) == 1
    only_work = SPEC.format(keep=3).split("[compartments.scratch]")[0]
    live.ok("apply", str(live.spec(only_work, "work-only.toml")), "--purge")
    assert not paths.state_dir("scratch").exists()
    assert all("scratch" not in path for path in subvolumes(paths.state_root))
    live.ok("apply", str(live.spec(SPEC.format(keep=3))))
    assert btrfs.is_subvolume(paths.home("scratch"))
    json.dumps(live.listed("scratch"))  # empty again, and listable
