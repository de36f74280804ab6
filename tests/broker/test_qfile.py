"""qnix/inside/qfile.py in process: hostile streams straight into `unpack`, in a temporary
folder standing for a compartment's home, with a sibling `outside` folder that must never
change. Fast, so hypothesis can try many streams; the live tests show the same program
refusing inside a real compartment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qnix.inside import qfile
from tests.broker.streams import END, entry, lying_entry, stream, tree

SOURCE = "work"
FAST = qfile.Limits(max_depth=8, max_entries=40, max_bytes=4096, idle_timeout=2)


class Place:
    """root/home (the compartment's home, with traps in it) and root/outside (never touched)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.outside = root / "outside"
        self.home.mkdir()
        self.outside.mkdir()
        (self.outside / "sentinel").write_bytes(b"keep")
        # Traps: a symlink out of the home, a file beside the incoming folder.
        (self.home / "out").symlink_to("../outside")
        (self.home / "notes").write_bytes(b"mine")
        self.incoming = self.home / qfile.INCOMING / SOURCE

    def everything_but_incoming(self) -> dict[str, tuple[str, int, bytes | str]]:
        """All but ~/QubesIncoming/SOURCE and what is in it (unpack makes the two folders)."""
        mine = f"home/{qfile.INCOMING}"
        return {
            path: value
            for path, value in tree(self.root).items()
            if path != mine and not path.startswith(f"{mine}/{SOURCE}")
        }

    def unpack(self, data: bytes, limits: qfile.Limits = FAST) -> dict[str, object]:
        feed = self.root / "stream"
        feed.write_bytes(data)
        home_fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY)
        in_fd = os.open(feed, os.O_RDONLY)
        try:
            return qfile.unpack(home_fd, SOURCE, in_fd, limits)
        finally:
            os.close(in_fd)
            os.close(home_fd)
            feed.unlink()


@contextmanager
def place() -> Iterator[Place]:
    with tempfile.TemporaryDirectory(prefix="qnix-qfile-") as root:
        yield Place(Path(root))


def refused(where: Place, data: bytes, limits: qfile.Limits = FAST) -> str:
    """Unpack must refuse `data` and leave nothing, in the incoming folder or anywhere else."""
    before = where.everything_but_incoming()
    incoming_before = tree(where.incoming) if where.incoming.exists() else {}
    with pytest.raises((qfile.QfileError, OSError)) as caught:
        where.unpack(data, limits)
    assert where.everything_but_incoming() == before
    assert (tree(where.incoming) if where.incoming.exists() else {}) == incoming_before
    return str(caught.value)


# ---- the stream from pack arrives exactly ------------------------------------------------------


def test_pack_then_unpack_gives_the_same_files_modes_and_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "docs" / "deep" / "er").mkdir(parents=True)
    (source / "docs" / "a.txt").write_bytes(b"alpha\n")
    (source / "docs" / "deep" / "er" / "b.bin").write_bytes(bytes(range(256)) * 300)
    (source / "docs" / "empty").write_bytes(b"")
    (source / "docs" / "deep" / "to-b").symlink_to("er/b.bin")
    (source / "docs" / "up").symlink_to("../top.sh")
    (source / "top.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(source / "docs" / "a.txt", 0o640)
    os.chmod(source / "top.sh", 0o755)  # noqa: S103 - a mode to carry over
    os.chmod(source / "docs" / "deep", 0o750)  # noqa: S103
    packed = tmp_path / "packed"
    with packed.open("wb") as out:
        qfile.pack([str(source / "docs"), str(source / "top.sh")], out.fileno())
    with place() as where:
        summary = where.unpack(packed.read_bytes(), qfile.Limits())
        assert tree(where.incoming) == tree(source)
        assert summary["files"] == 4
        assert summary["folders"] == 3
        assert summary["symlinks"] == 2
        assert summary["bytes"] == 6 + 256 * 300 + 0 + 10
        assert summary["top"] == ["docs", "top.sh"]
        # A second copy of the same names is refused and changes nothing.
        refused(where, packed.read_bytes(), qfile.Limits())


def test_pack_refuses_fifos_and_devices(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(qfile.QfileError, match="a fifo"):
            qfile.pack([str(tmp_path)], out)
        with pytest.raises(qfile.QfileError, match="a device"):
            qfile.pack(["/dev/null"], out)
        with pytest.raises(qfile.QfileError, match="not a regular file"):
            qfile.pack([str(tmp_path)], out, single_file=True)
    finally:
        os.close(out)


# ---- each kind of hostile stream, by example -------------------------------------------------

F, D, L = qfile.FILE, qfile.FOLDER, qfile.LINK

HOSTILE = {
    "dot-dot": stream(entry(F, "../escape", b"x")),
    "dot-dot inside": stream(entry(D, "a"), entry(F, "a/../../escape", b"x")),
    "absolute": stream(entry(F, "/tmp/escape", b"x")),
    "empty component": stream(entry(D, "a"), entry(F, "a//b", b"x")),
    "dot": stream(entry(F, ".", b"x")),
    "newline": stream(entry(F, "a\nb", b"x")),
    "nul": stream(entry(F, b"a\x00b", b"x")),
    "invalid utf-8": stream(entry(F, b"\xff\xfe", b"x")),
    "bidi override": stream(entry(F, "txt.\u202eexe", b"x")),
    "zero width": stream(entry(F, "a\u200bb", b"x")),
    "too long name": stream(entry(F, "n" * 256, b"x")),
    "empty name": stream(entry(F, b"", b"x")),
    "symlink out": stream(entry(L, "link", b"../../outside")),
    "symlink absolute": stream(entry(L, "link", b"/etc")),
    "symlink dot-dot later": stream(entry(D, "a"), entry(L, "a/link", b"b/../../..")),
    "write through sent symlink": stream(
        entry(D, "d"), entry(D, "d/real"), entry(L, "d/alias", b"real"), entry(F, "d/alias/f", b"x")
    ),
    "file before its folder": stream(entry(F, "a/b", b"x")),
    "file as folder": stream(entry(F, "a", b"x"), entry(F, "a/b", b"x")),
    "sent twice": stream(entry(F, "a", b"x"), entry(F, "a", b"y")),
    "folder twice": stream(entry(D, "a"), entry(D, "a")),
    "char device": stream(entry(b"C", "dev")),
    "block device": stream(entry(b"B", "dev")),
    "fifo": stream(entry(b"P", "fifo")),
    "socket": stream(entry(b"S", "sock")),
    "truncated data": stream(lying_entry(F, "big", 100, b"short"), end=False),
    "truncated header": qfile.MAGIC + entry(F, "a", b"x")[:7],
    "no end": stream(entry(F, "a", b"x"), end=False),
    "data after end": stream(entry(F, "a", b"x")) + b"more",
    "bad magic": b"QNIXFILE0\n" + END,
    "empty": b"",
    "no entries": stream(),
    "folder with data": stream(lying_entry(D, "d", 3, b"abc")),
    "staging name": stream(entry(F, ".qnix-partial-0011223344556677", b"x")),
    "staging name inside": stream(entry(D, "d"), entry(D, "d/.qnix-partial-00")),
    "temporary name": stream(entry(F, ".qnix-tmp-1", b"x")),
    "temporary name inside": stream(entry(D, "d"), entry(F, "d/.qnix-tmp-edit-00", b"x")),
    "too deep": stream(*(entry(D, "/".join(["d"] * n)) for n in range(1, 10))),
    "too many": stream(*(entry(F, f"f{n}", b"") for n in range(41))),
    "too large": stream(entry(F, "a", b"x" * 3000), entry(F, "b", b"x" * 1097)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_stream_is_refused_and_leaves_nothing(name: str) -> None:
    with place() as where:
        refused(where, HOSTILE[name])


def test_the_limits_are_exact() -> None:
    deep = stream(*(entry(D, "/".join(["d"] * n)) for n in range(1, 9)))
    many = stream(*(entry(F, f"f{n}", b"") for n in range(40)))
    large = stream(entry(F, "a", b"x" * 3000), entry(F, "b", b"x" * 1096))
    for data in (deep, many, large):
        with place() as where:
            where.unpack(data)


def test_symlinks_inside_the_incoming_folder_are_kept() -> None:
    data = stream(
        entry(D, "a"),
        entry(D, "a/b"),
        entry(F, "a/b/f", b"x"),
        entry(L, "a/b/up2", b"../.."),
        entry(L, "a/b/sib", b"../b/f"),
        entry(L, "a/here", b"b/f"),
    )
    with place() as where:
        where.unpack(data)
        assert os.readlink(where.incoming / "a/b/up2") == "../.."
        assert (where.incoming / "a/here").read_bytes() == b"x"


def test_traps_planted_in_the_target_are_not_followed() -> None:
    data = stream(entry(F, "f", b"x"))
    with place() as where:
        (where.home / qfile.INCOMING).symlink_to("../outside")
        assert "not a folder of its own" in refused(where, data)
    with place() as where:
        (where.home / qfile.INCOMING).mkdir()
        where.incoming.symlink_to("../../outside")
        assert "not a folder of its own" in refused(where, data)
    with place() as where:
        where.incoming.mkdir(parents=True)
        (where.incoming / "f").symlink_to("../../../outside/sentinel")
        assert "already in" in refused(where, data)


def test_a_staging_folder_left_by_a_killed_unpack_is_removed() -> None:
    with place() as where:
        stale = where.incoming / f"{qfile.STAGING_PREFIX}deadbeefdeadbeef"
        stale.mkdir(parents=True)
        (stale / "half").write_bytes(b"half")
        where.unpack(stream(entry(F, "f", b"x")))
        assert sorted(os.listdir(where.incoming)) == ["f"]


# ---- hostile streams at random ---------------------------------------------------------------

NASTY_COMPONENTS = [
    "..",
    ".",
    "",
    "a",
    "b",
    "out",
    "notes",
    "home",
    "outside",
    "x\ny",
    "\u202e",
    "é",
    "n" * 256,
    qfile.INCOMING,
    ".qnix-tmp-1",
]
NASTY_TARGETS = [
    b"../outside",
    b"../../outside",
    b"/etc",
    b"a",
    b"..",
    b"../..",
    b"a/../..",
    b"../../../../outside/sentinel",
    b"b/c",
    b"",
]


NICE_COMPONENTS = ["a", "b", "c", "d é"]


NICE_COMPONENTS = ["a", "b", "c", "d é", "e", "f"]
KINDS = [F] * 4 + [D] * 4 + [L] * 3 + [b"C", b"P", b"E", b"\x00"]


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Mostly well-formed trees (each entry below a folder sent before it, so that streams
    often get far or through), with hostile names, types, targets and truncations mixed in."""
    folders = [""]
    parts = []
    hostile = draw(st.booleans())  # else only the symlink targets may be hostile
    kinds = KINDS if hostile else [F, D, L]
    components = NICE_COMPONENTS * 10 + NASTY_COMPONENTS if hostile else NICE_COMPONENTS
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(kinds))
        if hostile and draw(st.integers(0, 14)) == 0:
            raw = draw(st.binary(max_size=12))
        else:
            parent = draw(st.sampled_from(folders))
            component = draw(st.sampled_from(components))
            raw = (f"{parent}/{component}" if parent else component).encode()
            if hostile and draw(st.integers(0, 19)) == 0:
                raw = b"/" + raw
        if kind == D:
            folders.append(raw.decode(errors="replace"))
        data = b""
        if kind == L:
            data = draw(st.sampled_from(NASTY_TARGETS))
        elif kind == F:
            data = draw(st.binary(max_size=64))
        mode = draw(st.sampled_from([0o644, 0o4755, 0o777, 0o000, 0o2750]))
        parts.append(entry(kind, raw, data, mode))
    data = stream(*parts, end=not hostile or draw(st.integers(0, 7)) > 0)
    if hostile and draw(st.integers(0, 7)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams())
@example(stream(entry(L, "a", b"a")))  # a link to itself
@example(stream(entry(D, "d"), entry(F, "d/.qnix-tmp-1", b"x")))  # a working name, inside
def test_nothing_is_ever_written_outside_the_incoming_folder(data: bytes) -> None:
    with place() as where:
        before = where.everything_but_incoming()
        try:
            summary = where.unpack(data)
        except (qfile.QfileError, OSError):
            # Refused: nothing at all remains of it.
            assert tree(where.incoming) == {}
        else:
            arrived = tree(where.incoming)
            assert set(summary["top"]) == {path.split("/")[0] for path in arrived}  # type: ignore[arg-type]
            for path, (kind, mode, content) in arrived.items():
                assert all(not qfile.component_problem(part) for part in path.split("/"))
                assert not path.split("/")[-1].startswith((".qnix-tmp-", ".qnix-partial-"))
                assert mode & 0o7000 == 0
                if kind == "symlink":
                    # realpath, not Path.resolve: a link to itself is a harmless loop that
                    # reaches nothing, and resolve() raises on it.
                    target = (where.incoming / path).parent.joinpath(content)
                    resolved = Path(os.path.realpath(target))
                    assert resolved.is_relative_to(os.path.realpath(where.incoming))
        assert where.everything_but_incoming() == before
        assert (where.outside / "sentinel").read_bytes() == b"keep"


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(
            st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=20
        ).filter(lambda name: not qfile.component_problem(name)),
        st.binary(max_size=300),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([0o600, 0o644, 0o755, 0o400]),
)
def test_any_valid_names_and_contents_arrive_exactly(files: dict[str, bytes], mode: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "folder"
        source.mkdir()
        for name, content in files.items():
            (source / name).write_bytes(content)
            os.chmod(source / name, mode)
        packed = Path(scratch) / "packed"
        with packed.open("wb") as out:
            qfile.pack([str(source)], out.fileno())
        with place() as where:
            where.unpack(packed.read_bytes())
            assert tree(where.incoming / "folder") == tree(source)


def test_replace_swaps_in_the_edit_only_over_the_content_that_was_sent(tmp_path: Path) -> None:
    original = tmp_path / "doc.txt"
    original.write_bytes(b"before")
    os.chmod(original, 0o640)
    sent = qfile.digest(str(original))["sha256"]
    feed = tmp_path / "feed"
    feed.write_bytes(stream(entry(F, "doc.txt", b"after")))

    def replace(expected: str) -> dict[str, object]:
        in_fd = os.open(feed, os.O_RDONLY)
        try:
            return qfile.replace(str(original), expected, in_fd)
        finally:
            os.close(in_fd)

    with pytest.raises(qfile.QfileError, match="changed since it was sent"):
        replace("0" * 64)
    assert original.read_bytes() == b"before"
    assert replace(sent)["size"] == 5
    assert original.read_bytes() == b"after"
    assert original.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["doc.txt", "feed"]
    feed.write_bytes(stream(entry(F, "doc.txt", b"x"), entry(F, "more", b"y")))
    with pytest.raises(qfile.QfileError, match="exactly one"):
        replace(qfile.digest(str(original))["sha256"])
    assert original.read_bytes() == b"after"
    assert sorted(os.listdir(tmp_path)) == ["doc.txt", "feed"]
