"""A persistent compartment's state at rest: encrypted snapshots at each stop and on demand,
retention, restore (safe against hostile archives), diff, and atomicity under SIGKILL.

The live part runs on a stand-in host (tests/runtime/livehost.py) through the installed `qnix`;
the store's own guarantees are tested on plain folders with the real `age`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import secrets
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.runtime import archives, state
from qnix.runtime.archives import UnsafeMember
from qnix.runtime.snapshots import SnapshotStore
from tests.conftest import need
from tests.runtime.livehost import LiveHost

OWNER = (0x7ABC0001, 0x7ABC0001)

# ---- helpers -----------------------------------------------------------------------------------

TreeEntry = tuple[object, ...]


def tree(root: Path) -> dict[str, TreeEntry]:
    """Everything below `root` as the host sees it: kind, permissions, owner, content or link
    target, and the link count (hard links)."""
    found: dict[str, TreeEntry] = {}
    for folder, folders, files in os.walk(root):
        for entry in folders + files:
            path = Path(folder, entry)
            info = path.lstat()
            name = str(path.relative_to(root))
            owner = (info.st_uid, info.st_gid)
            if stat.S_ISLNK(info.st_mode):
                found[name] = ("symlink", os.readlink(path), owner)
            elif stat.S_ISDIR(info.st_mode):
                found[name] = ("folder", stat.S_IMODE(info.st_mode), owner)
            elif not stat.S_ISREG(info.st_mode):
                found[name] = ("special", stat.S_IFMT(info.st_mode))
            else:
                content = path.read_bytes()
                found[name] = ("file", stat.S_IMODE(info.st_mode), owner, content, info.st_nlink)
    return found


@pytest.fixture(scope="module")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "host.agekey"
    subprocess.run([need("age-keygen"), "-o", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    return key


def encrypt(data: bytes, key: Path) -> bytes:
    recipient = state.recipients_of(key)[0]
    return subprocess.run(
        [need("age"), "--encrypt", "--recipient", recipient],
        input=data,
        capture_output=True,
        check=True,
    ).stdout


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in members:
            member.size = len(data) if member.type == tarfile.REGTYPE else 0
            archive.addfile(member, io.BytesIO(data) if member.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    linkname: str = "",
    mode: int = 0o644,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def make_tree(root: Path, marker: str) -> None:
    """A folder with what a home holds: nested folders, modes, links of both kinds, a hard
    link, an empty folder, a name no terminal should see raw, a name that is not UTF-8."""
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "docs" / "deep" / "note.txt").write_text(f"note {marker}\n")
    (root / "docs" / "deep" / "note.txt").chmod(0o600)
    (root / "run.sh").write_text(f"#!/bin/sh\necho {marker}\n")
    (root / "run.sh").chmod(0o755)
    (root / "docs").chmod(0o750)
    os.symlink("docs/deep/note.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.link(root / "run.sh", root / "hard")
    (root / f"odd\nname-{marker}").write_bytes(marker.encode())
    with open(os.fsencode(root) + b"/latin-\xe9", "wb") as handle:
        handle.write(b"not utf-8")


# ---- the store on plain folders ------------------------------------------------------------------


def test_a_snapshot_is_encrypted_and_restores_the_same_tree(tmp_path: Path, host_key: Path) -> None:
    marker = "m" + secrets.token_hex(12)
    source = tmp_path / "home"
    source.mkdir(mode=0o700)
    make_tree(source, marker)
    os.mkfifo(source / "fifo")  # not state: left out
    store = SnapshotStore(tmp_path / "snapshots")
    taken = store.take(source, state.recipients_of(host_key), "manual", keep=5)
    ciphertext = taken.path.read_bytes()
    assert ciphertext.startswith(b"age-encryption.org/v1\n")
    assert marker.encode() not in ciphertext
    assert b"note.txt" not in ciphertext and b"docs/deep" not in ciphertext
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    assert sorted(os.listdir(store.folder)) == [taken.path.name, "latest"]
    assert taken.path.name.startswith("000001-") and taken.path.name.endswith("-manual.tar.age")
    assert store.latest() == taken

    dest = tmp_path / "restored"
    dest.mkdir()
    assert store.unpack(taken, host_key, dest, OWNER) == 10
    expected = {
        name: (*entry[:2], OWNER, *entry[3:])
        for name, entry in tree(source).items()
        if name != "fifo"
    }
    assert tree(dest) == expected
    assert tree(dest)["hard"][-1] == 2  # still one file with two names
    assert store.manifest(taken, host_key) == archives.tree_manifest(source)


def test_retention_keeps_the_latest_n(tmp_path: Path, host_key: Path) -> None:
    source = tmp_path / "home"
    source.mkdir()
    (source / "f").write_text("x")
    store = SnapshotStore(tmp_path / "snapshots")
    recipients = state.recipients_of(host_key)
    for _ in range(5):
        store.take(source, recipients, "stop", keep=3)
    assert [s.id for s in store.snapshots()] == [3, 4, 5]
    assert store.latest() is not None and store.latest().id == 5  # type: ignore[union-attr]
    store.take(source, recipients, "manual", keep=0)  # 0: removes nothing
    assert [s.id for s in store.snapshots()] == [3, 4, 5, 6]
    assert [s.id for s in store.prune(1)] == [3, 4, 5]
    assert [(s.id, s.reason) for s in store.snapshots()] == [(6, "manual")]


def test_diff_lists_exactly_what_was_added_removed_and_changed(
    tmp_path: Path, host_key: Path
) -> None:
    source = tmp_path / "home"
    source.mkdir()
    make_tree(source, "x")
    store = SnapshotStore(tmp_path / "snapshots")
    recipients = state.recipients_of(host_key)
    first = store.take(source, recipients, "manual", keep=5)
    (source / "added").write_text("new")
    (source / "docs" / "new-folder").mkdir()
    (source / "empty").rmdir()
    (source / "abs-link").unlink()
    (source / "docs" / "deep" / "note.txt").chmod(0o644)  # permissions only
    with (source / "run.sh").open("a") as handle:  # the content of both its names
        handle.write("# more\n")
    (source / "rel-link").unlink()
    os.symlink("run.sh", source / "rel-link")  # another target
    (source / f"odd\nname-{'x'}").unlink()
    os.symlink("elsewhere", source / f"odd\nname-{'x'}")  # a file became a link
    os.utime(source / "latin-\udce9", (1, 1))  # the time alone is no change
    second = store.take(source, recipients, "manual", keep=5)
    expected = archives.Diff(
        added=("added", "docs/new-folder"),
        removed=("abs-link", "empty"),
        changed=("docs/deep/note.txt", "hard", "odd\nname-x", "rel-link", "run.sh"),
    )
    before = store.manifest(first, host_key)
    assert archives.compare(before, store.manifest(second, host_key)) == expected
    assert archives.compare(before, archives.tree_manifest(source)) == expected
    assert archives.compare(store.manifest(second, host_key), archives.tree_manifest(source)) == (
        archives.Diff((), (), ())
    )
    assert expected.to_json()["changed"][2] == "odd\\x0aname-x"


def test_names_from_a_compartment_are_shown_escaped() -> None:
    assert archives.shown("plain name.txt") == "plain name.txt"
    assert archives.shown("a\nb\x1b[31m\\") == "a\\x0ab\\x1b[31m\\\\"
    assert archives.shown("latin-\udce9") == "latin-\\xe9"
    assert archives.shown("bidi\u202etxt.exe") == "bidi\\u202etxt.exe"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_a_shown_name_is_printable(untrusted: str) -> None:
    assert archives.shown(untrusted).isprintable()


# ---- hostile archives ---------------------------------------------------------------------------

HOSTILE = [
    ("absolute", [member("/tmp/qnix-state-escape")], "has an absolute name"),
    ("dot-dot", [member("../escape")], "not in normal form"),
    ("dot-dot-inside", [member("a", tarfile.DIRTYPE), member("a/../../e")], "not in normal form"),
    ("dot", [member("./a")], "not in normal form"),
    ("empty-part", [member("a//b")], "not in normal form"),
    (
        "through-a-symlink",
        [member("out", tarfile.SYMTYPE, linkname="{outside}"), member("out/pwned")],
        "not inside a folder of the archive",
    ),
    (
        "through-a-file",
        [member("f"), member("f/g")],
        "not inside a folder of the archive",
    ),
    (
        "parent-not-in-archive",
        [member("never-made/x")],
        "not inside a folder of the archive",
    ),
    (
        "hard-link-out",
        [member("h", tarfile.LNKTYPE, linkname="/etc/passwd")],
        "not a file of this archive",
    ),
    (
        "hard-link-up",
        [member("h", tarfile.LNKTYPE, linkname="../victim")],
        "not a file of this archive",
    ),
    (
        "hard-link-to-a-symlink",
        [
            member("s", tarfile.SYMTYPE, linkname="/etc/passwd"),
            member("h", tarfile.LNKTYPE, "", "s"),
        ],
        "not a file of this archive",
    ),
    ("character-device", [member("null", tarfile.CHRTYPE)], "is a character device"),
    ("block-device", [member("disk", tarfile.BLKTYPE)], "is a block device"),
    ("fifo", [member("pipe", tarfile.FIFOTYPE)], "is a FIFO"),
    (
        "twice",
        [member("a", data=b"first"), member("a", tarfile.SYMTYPE, linkname="/etc/shadow")],
        "appears twice",
    ),
]


@pytest.mark.parametrize(
    ("members", "refusal"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(
    tmp_path: Path, host_key: Path, members: list[tuple[tarfile.TarInfo, bytes]], refusal: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "victim").write_text("victim")
    for info, _ in members:
        info.linkname = info.linkname.replace("{outside}", str(outside))
    store = SnapshotStore(tmp_path / "snapshots")
    store.folder.mkdir()
    path = store.folder / "000001-20250101T000000Z-manual.tar.age"
    path.write_bytes(encrypt(tar_of(*members), host_key))
    passwd_links = os.stat("/etc/passwd").st_nlink
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeMember, match=refusal):
        store.unpack(store.find(1, "work"), host_key, dest, OWNER)
    assert os.listdir(outside) == []
    assert not Path("/tmp/qnix-state-escape").exists()
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    assert (tmp_path / "victim").stat().st_nlink == 1
    assert [p.name for p in store.folder.iterdir()] == [path.name]  # its work folder is gone


def test_links_are_restored_as_they_were_and_never_followed(tmp_path: Path, host_key: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tar_of(
        member("out", tarfile.SYMTYPE, linkname=str(outside)),
        member("up", tarfile.SYMTYPE, linkname="../../etc"),
        member("f", data=b"data", mode=0o4755),  # setuid: dropped
        member("h", tarfile.LNKTYPE, linkname="f"),
    )
    store = SnapshotStore(tmp_path / "snapshots")
    store.folder.mkdir()
    (store.folder / "000001-20250101T000000Z-manual.tar.age").write_bytes(
        encrypt(archive, host_key)
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    assert store.unpack(store.find(None, "work"), host_key, dest, OWNER) == 4
    assert tree(dest) == {
        "out": ("symlink", str(outside), OWNER),
        "up": ("symlink", "../../etc", OWNER),
        "f": ("file", 0o755, OWNER, b"data", 2),
        "h": ("file", 0o755, OWNER, b"data", 2),
    }
    assert os.listdir(outside) == []


def test_a_tampered_or_truncated_snapshot_is_refused(tmp_path: Path, host_key: Path) -> None:
    source = tmp_path / "home"
    source.mkdir()
    (source / "f").write_bytes(os.urandom(300_000))
    store = SnapshotStore(tmp_path / "snapshots")
    taken = store.take(source, state.recipients_of(host_key), "manual", keep=5)
    data = bytearray(taken.path.read_bytes())
    data[-1000] ^= 1
    taken.path.write_bytes(bytes(data))
    with pytest.raises(state.QnixError, match="age failed"):
        store.manifest(taken, host_key)
    taken.path.write_bytes(bytes(data[: len(data) // 2]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(state.QnixError):
        store.unpack(taken, host_key, dest, OWNER)
    assert sorted(os.listdir(store.folder)) == [taken.path.name, "latest"]


NAME_PARTS = st.sampled_from(["a", "b", "..", ".", "", "c", "/", "\n", "a/b", "..."])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(NAME_PARTS, min_size=1, max_size=4), KINDS, NAME_PARTS),
        min_size=1,
        max_size=6,
    )
)
def test_whatever_an_archive_holds_nothing_lands_outside(
    entries: list[tuple[list[str], bytes, str]],
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        outside, dest = base / "outside", base / "dest"
        outside.mkdir()
        dest.mkdir()
        members = []
        for parts, kind, target in entries:
            linkname = str(outside) if target == "/" else target
            members.append(member("/".join(parts), kind, b"x", linkname))
        try:
            data = tar_of(*members)
        except (ValueError, tarfile.TarError):
            return  # not even writable as a tar
        with contextlib.suppress(state.QnixError):  # UnsafeMember among them
            archives.unpack_tree(io.BytesIO(data), dest, OWNER)
        assert os.listdir(outside) == []
        assert sorted(os.listdir(base)) == ["dest", "outside"]
        for folder, _, files in os.walk(dest):
            for name in files:
                info = Path(folder, name).lstat()
                assert (info.st_uid, info.st_gid) == OWNER


# ---- atomicity under SIGKILL --------------------------------------------------------------------

TAKER = """
import sys
from pathlib import Path
from qnix.runtime.snapshots import SnapshotStore
store = SnapshotStore(Path(sys.argv[1]))
print("go", flush=True)
store.take(Path(sys.argv[2]), sys.argv[3:], "manual", 3)
"""


def start_taker(folder: Path, source: Path, recipients: tuple[str, ...]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", TAKER, str(folder), str(source), *recipients],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "go\n"
    return process


def close(process: subprocess.Popen[str]) -> None:
    if process.stdout is not None:
        process.stdout.close()


def tool_processes_of(folder: Path, tool: str = "age") -> list[int]:
    """Processes of `tool` whose command line names something in `folder`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if (
                str(folder).encode() in argv
                and os.path.basename(argv.split(b"\0")[0]) == tool.encode()
            ):
                found.append(int(entry))
    return found


def test_sigkill_at_any_point_never_shows_a_partial_snapshot(
    tmp_path: Path, host_key: Path
) -> None:
    source = tmp_path / "home"
    source.mkdir()
    make_tree(source, "k")
    for number in range(4):
        (source / f"data-{number}").write_bytes(os.urandom(1 << 20))
    for number in range(150):
        (source / "docs" / f"small-{number}").write_text(f"small {number}\n" * number)
    wanted = archives.tree_manifest(source)
    recipients = state.recipients_of(host_key)
    folder = tmp_path / "snapshots"
    store = SnapshotStore(folder)
    store.take(source, recipients, "manual", keep=3)  # a latest to keep intact

    process = start_taker(folder, source, recipients)
    began = time.monotonic()
    process.wait(timeout=60)
    duration = time.monotonic() - began
    close(process)
    seed = random.randrange(1 << 32)
    chance = random.Random(seed)
    outcomes = {"finished": 0, "cut": 0}
    for kill in range(30):
        before = [s.id for s in store.snapshots()]
        process = start_taker(folder, source, recipients)
        time.sleep(chance.uniform(0, duration * 1.3))
        if kill % 2:
            os.killpg(process.pid, signal.SIGKILL)  # the whole snapshot, age with it
        else:
            process.kill()  # qnix alone; its age ends or is woken by the next snapshot
        process.wait(timeout=60)
        close(process)
        listed = store.snapshots()
        latest = store.latest()
        context = f"seed {seed}, kill {kill}, {sorted(os.listdir(folder))}"
        assert latest is not None and latest in listed, context
        for snapshot in listed:  # every listed snapshot is complete and authentic
            assert store.manifest(snapshot, host_key) == wanted, context
        dest = tmp_path / f"restored-{kill}"
        dest.mkdir()
        store.unpack(latest, host_key, dest, OWNER)
        assert archives.tree_manifest(dest) == wanted, context
        outcomes["finished" if [s.id for s in listed] != before else "cut"] += 1
    assert outcomes["finished"] >= 1 and outcomes["cut"] >= 1, (seed, outcomes)

    final = store.take(source, recipients, "manual", keep=3)
    assert sorted(os.listdir(folder)) == sorted(
        ["latest", *(s.path.name for s in store.snapshots())]
    )
    assert store.latest() == final and len(store.snapshots()) == 3
    deadline = time.monotonic() + 10
    while tool_processes_of(folder):
        assert time.monotonic() < deadline, "an age process of a killed snapshot is left"
        time.sleep(0.05)


# ---- live: through `qnix`, on a stand-in host ----------------------------------------------------

SPEC = """\
[host]
hostname = "lab"
subnet = "10.219.0.0/16"

[compartments.work]
memory_mb = 128
snapshots = {keep}

[compartments.scratch]
memory_mb = 128
snapshots = 0
"""

WRITE = """
set -e
mkdir -p docs/deep empty
printf 'note {m}\\n' > docs/deep/note.txt
chmod 600 docs/deep/note.txt
printf '#!/bin/sh\\necho {m}\\n' > run.sh
chmod 755 run.sh
chmod 750 docs
ln -s docs/deep/note.txt rel-link
ln -s /etc/hostname abs-link
ln run.sh hard
printf '{m}' > "$(printf 'odd\\nname-{m}')"
head -c 300000 /dev/urandom > blob
"""

CHANGE = """
set -e
rm blob
printf 'X' >> run.sh
echo new > added
chmod 644 docs/deep/note.txt
rm rel-link
ln -s run.sh rel-link
"""


class Live(LiveHost):
    TIMEOUT = 120.0

    def __init__(self, key: Path) -> None:
        super().__init__(age_identity=key)
        self.key = key

    def listed(self, name: str = "work") -> list[dict[str, object]]:
        rows = json.loads(self.ok("state", "ls", name, "--json"))
        assert isinstance(rows, list)
        return rows

    def audit(self, event: str) -> list[dict[str, object]]:
        lines = self.paths.audit_log.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == event]


@pytest.fixture(scope="module")
def live(host_key: Path) -> Iterator[Live]:
    made = Live(host_key)
    try:
        made.ok("apply", str(made.spec(SPEC.format(keep=3))))
        yield made
        made.qnix("stop", "work")
    finally:
        made.close()


def test_live_state_is_snapshotted_at_stop_encrypted_diffed_and_restored(live: Live) -> None:
    paths = live.paths
    home = paths.home("work")
    marker = "m" + secrets.token_hex(12)
    live.ok("run", "work", "--", "sh", "-c", WRITE.format(m=marker))
    assert live.ok("stop", "work") == "work: stopped\n"
    first_tree = tree(home)
    host_uid = home.stat().st_uid
    assert host_uid >= 0x70000000
    assert {entry[2] for entry in first_tree.values()} == {(host_uid, host_uid)}

    (first,) = live.listed()
    assert (first["id"], first["reason"], first["latest"], first["kept"]) == (1, "stop", True, True)
    (snapshot_file,) = (paths.state_dir("work") / "snapshots").glob("000001-*-stop.tar.age")
    ciphertext = snapshot_file.read_bytes()
    assert marker.encode() not in ciphertext
    assert first["sha256"] == hashlib.sha256(ciphertext).hexdigest()
    assert (first["kind"], first["size"], first["uuid"]) == ("age", len(ciphertext), None)
    recorded = live.audit("snapshot")[-1]
    assert {k: recorded[k] for k in ("compartment", "reason", "snapshot", "sha256", "result")} == {
        "compartment": "work",
        "reason": "stop",
        "snapshot": 1,
        "sha256": first["sha256"],
        "result": "ok",
    }

    # Running: a snapshot needs --force, a restore is refused.
    live.ok("run", "work", "--", "sh", "-c", CHANGE)
    refused = live.qnix("state", "snapshot", "work")
    assert refused.returncode == 1
    assert "error: work is running" in refused.stderr
    assert "--force" in refused.stderr
    assert live.ok("state", "snapshot", "work", "--force").startswith("work: snapshot 2 (")
    refused = live.qnix("state", "restore", "work", "1")
    assert refused.returncode == 1
    assert "error: work is running" in refused.stderr
    live.ok("stop", "work")
    assert [(r["id"], r["reason"]) for r in live.listed()] == [
        (1, "stop"),
        (2, "manual"),
        (3, "stop"),
    ]

    changed = "changed docs/deep/note.txt\nchanged hard\nchanged rel-link\nchanged run.sh\n"
    expected = "added   added\nremoved blob\n" + changed
    assert live.ok("state", "diff", "work", "1", "3") == expected
    assert live.ok("state", "diff", "work", "1", "--live") == expected
    assert live.ok("state", "diff", "work") == "no differences\n"  # latest against live
    assert json.loads(live.ok("state", "diff", "work", "3", "1", "--json")) == {
        "added": ["blob"],
        "removed": ["added"],
        "changed": ["docs/deep/note.txt", "hard", "rel-link", "run.sh"],
    }

    restored = live.ok("state", "restore", "work", "1")
    assert restored == "work: restored snapshot 1 (10 entries); the state before is snapshot 4\n"
    assert tree(home) == first_tree
    assert (home.stat().st_uid, stat.S_IMODE(home.stat().st_mode)) == (host_uid, 0o700)
    assert [r["id"] for r in live.listed()] == [2, 3, 4]  # retention 3; 4 is the state before
    assert [r["id"] for r in live.listed() if r["latest"]] == [4]
    assert live.ok("state", "diff", "work", "4", "3") == "no differences\n"
    assert {k: live.audit("restore")[-1][k] for k in ("snapshot", "previous", "result")} == {
        "snapshot": 1,
        "previous": 4,
        "result": "ok",
    }
    assert not [p for p in paths.state_dir("work").iterdir() if p.name.startswith(".")]
    assert live.ok("run", "work", "--", "cat", "docs/deep/note.txt") == f"note {marker}\n"
    live.ok("stop", "work")


def test_live_retention_follows_the_spec(live: Live) -> None:
    for _ in range(3):
        live.ok("state", "snapshot", "work")
    ids = [r["id"] for r in live.listed()]
    assert len(ids) == 3 and ids == sorted(ids)
    live.ok("apply", str(live.spec(SPEC.format(keep=1))))
    assert [(r["latest"], r["kept"]) for r in live.listed()] == [
        (False, False),
        (False, False),
        (True, True),
    ]
    table = live.ok("state", "ls", "work").splitlines()
    assert table[0].split() == ["ID", "TIME", "REASON", "KIND", "SIZE", "SHA256/UUID", "STATUS"]
    assert [line.split()[3] for line in table[1:]] == ["age"] * 3
    assert [line.split()[-1] for line in table[1:]] == ["expires", "expires", "latest"]
    live.ok("state", "snapshot", "work")
    assert [r["id"] for r in live.listed()] == [ids[-1] + 1]

    # snapshots = 0: no snapshot at stop.
    live.ok("run", "scratch", "--", "sh", "-c", "echo x > f")
    live.ok("stop", "scratch")
    assert live.ok("state", "ls", "scratch") == "scratch: no snapshots\n"
    assert not (live.paths.state_dir("scratch") / "snapshots").exists()


def test_live_a_failed_snapshot_at_stop_still_stops(live: Live) -> None:
    live.ok("run", "work", "--", "true")
    # Neither the identity nor its recorded public key (tests/cli/test_office_admin.py: with
    # the key recorded, the same stop snapshots).
    live.paths.recipient_file.unlink()
    without_key = {**live.env, "QNIX_AGE_IDENTITY": "/nonexistent/host.agekey"}
    result = live.qnix("stop", "work", env=without_key)
    assert (result.returncode, result.stdout) == (0, "work: stopped\n")
    assert (
        "work: stopped, but its state could not be snapshotted: no age identity at "
        "/nonexistent/host.agekey"
    ) in result.stderr
    assert live.ls()["work"]["state"] == "stopped"
    last = live.audit("snapshot")[-1]
    assert last["result"] == "error: no age identity at /nonexistent/host.agekey"


def test_live_a_hostile_snapshot_is_refused_and_the_home_kept(live: Live, tmp_path: Path) -> None:
    paths = live.paths
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = tar_of(
        member("ok", data=b"fine"),
        member("out", tarfile.SYMTYPE, linkname=str(outside)),
        member("out/pwned", data=b"pwned"),
    )
    folder = paths.state_dir("work") / "snapshots"
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "000099-20250101T000000Z-manual.tar.age").write_bytes(encrypt(hostile, live.key))
    before = tree(paths.home("work"))
    refused = live.qnix("state", "restore", "work", "99")
    assert refused.returncode == 1
    assert "error: member 'out/pwned' is not inside a folder of the archive" in refused.stderr
    assert os.listdir(outside) == []
    assert tree(paths.home("work")) == before
    assert not [p for p in paths.state_dir("work").iterdir() if p.name.startswith(".")]
    assert str(live.audit("restore")[-1]["result"]).startswith("error: member 'out/pwned'")


def test_gc_removes_what_an_interrupted_snapshot_or_restore_left(live: Live) -> None:
    paths = live.paths
    work = paths.state_dir("work") / "snapshots" / ".tmp-interrupted"
    work.mkdir(parents=True)
    os.mkfifo(work / "pipe")
    (work / "snapshot").write_bytes(b"half")
    (paths.state_dir("work") / ".restore-interrupted").mkdir()
    assert live.ok("gc").splitlines() == [
        "work: removed an unfinished restore (.restore-interrupted)",
        "work: removed an unfinished snapshot (.tmp-interrupted)",
    ]
    assert live.ok("gc") == "nothing to remove\n"
