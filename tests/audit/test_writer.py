"""The writer: the line format, the head, names and values, and what it does with the states a
crashed or interfered-with writer leaves behind."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnix.audit import events
from qnix.audit.events import GENESIS, Head, append, decode, head_path, line_hash, read_head
from qnix.audit.verify import verify, verify_lines
from qnix.runtime.paths import RuntimePaths


def entries(log: Path) -> list[events.Entry]:
    return [decode(line) for line in events.split_lines(log.read_bytes())]


def test_record_writes_the_chain_and_its_head(tmp_path: Path) -> None:
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    events.record(paths, "start", compartment="work", result="ok")
    events.record(paths, "run", compartment="work", argv=["sh", "-c", 'echo "hi"\n'], result=7)
    raw = paths.audit_log.read_bytes()
    first, second = raw.splitlines(keepends=True)
    assert json.loads(first) == {
        "seq": 1,
        "time": decode(first).time,
        "event": "start",
        "compartment": "work",
        "result": "ok",
        "prev": GENESIS,
    }
    assert second == (
        b'{"seq":2,"time":"' + decode(second).time.encode() + b'","event":"run",'
        b'"argv":["sh","-c","echo \\"hi\\"\\n"],"compartment":"work","result":7,'
        b'"prev":"' + line_hash(first).encode() + b'"}\n'
    )
    assert read_head(head_path(paths.audit_log)) == Head(2, line_hash(second), len(raw))
    audit_dir = paths.audit_log.parent
    assert sorted(os.listdir(audit_dir)) == ["events.head", "events.jsonl", "events.lock"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in audit_dir.iterdir()} == {0o600}
    assert stat.S_IMODE(audit_dir.stat().st_mode) == 0o700
    assert verify(paths.audit_log).ok


@pytest.mark.parametrize(
    "event", ["policy", "copy", "open-in-dvm", "audit.repair", "a" * 64, "x9.y-z"]
)
def test_any_event_name_of_the_vocabulary_is_taken(tmp_path: Path, event: str) -> None:
    assert append(tmp_path / "events.jsonl", event, {}) == 1
    assert entries(tmp_path / "events.jsonl")[0].event == event


@pytest.mark.parametrize(
    "event", ["", "Start", "9lives", "a" * 65, "with space", "new\nline", "ünï", "_x"]
)
def test_a_malformed_event_name_is_refused_before_writing(tmp_path: Path, event: str) -> None:
    with pytest.raises(ValueError, match="is not an audit event name"):
        append(tmp_path / "events.jsonl", event, {})
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seq": 5}, "is not an audit field key"),
        ({"prev": "x"}, "is not an audit field key"),
        ({"Bad": 1}, "is not an audit field key"),
        ({"a-b": 1}, "is not an audit field key"),
        ({"k" * 33: 1}, "is not an audit field key"),
        ({"big": 2**63}, "does not fit in 64 bits"),
        ({"nan": float("nan")}, "is not a finite number"),
        ({"inf": float("inf")}, "is not a finite number"),
        ({"mixed": ["a", 1]}, "is not a string, list of strings"),
        ({"nested": {"a": "b"}}, "is not a string, list of strings"),
        ({f"f{i}": i for i in range(33)}, "at most 32 fields"),
    ],
)
def test_fields_a_reader_could_not_trust_are_refused(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        append(tmp_path / "events.jsonl", "start", fields)  # type: ignore[arg-type]


def test_every_kind_of_value_round_trips(tmp_path: Path) -> None:
    fields: dict[str, events.FieldValue] = {
        "text": "x",
        "number": -(2**63),
        "real": 1.5,
        "flag": False,
        "nothing": None,
        "argv": ["a", ""],
        "under_score9": "y",
    }
    append(tmp_path / "events.jsonl", "call", fields)
    assert entries(tmp_path / "events.jsonl")[0].fields == fields


def test_a_huge_value_is_cut_to_fit_and_says_how_much_is_missing(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    append(log, "run", {"argv": ["x" * 100_000, "y"], "result": 0})
    assert entries(log)[0].fields == {
        "argv": ["x" * 4096 + f"...[+{100_000 - 4096} chars]", "y"],
        "result": 0,
    }
    # Two such values do not fit at 4096 characters each: both are cut to the next cap.
    append(log, "run", {"argv": ["x" * 100_000], "note": "z" * 50_000})
    assert entries(log)[1].fields == {
        "argv": ["x" * 1024 + f"...[+{100_000 - 1024} chars]"],
        "note": "z" * 1024 + f"...[+{50_000 - 1024} chars]",
    }
    many = [f"item{i}" for i in range(10_000)]
    append(log, "run", {"argv": many})
    cut = entries(log)[2].fields["argv"]
    assert isinstance(cut, list)
    assert cut[:-1] == many[: len(cut) - 1] and cut[-1] == f"...[+{10_000 - len(cut) + 1} items]"
    # Escapes count: a value of control characters is cut harder, still to fit.
    append(log, "run", {f"f{i}": "\x00" * 9000 for i in range(32)})
    assert max(len(line) for line in events.split_lines(log.read_bytes())) <= events.MAX_LINE_BYTES
    assert verify(log).ok


# ---- states a crash leaves, and damage --------------------------------------------------


def write_log(tmp_path: Path, count: int) -> Path:
    log = tmp_path / "audit" / "events.jsonl"
    for index in range(count):
        append(log, "start", {"compartment": f"c{index}"})
    return log


def successor(log: Path, seq: int, event: str = "stop") -> bytes:
    """The line the next writer would append (as if it stopped before moving the head)."""
    last = events.split_lines(log.read_bytes())[-1]
    return events.encode(seq, events.now(), event, {}, line_hash(last))


def test_a_line_written_before_the_head_moved_is_kept_and_the_head_moved_on(
    tmp_path: Path,
) -> None:
    log = write_log(tmp_path, 3)
    with log.open("ab") as handle:
        handle.write(successor(log, 4))
    result = verify(log)
    assert result.ok and result.entries == 4
    assert result.notes == (
        "entry 4 is written but the head was not moved on (a writer stopped between the two); "
        "the next append moves it",
    )
    assert append(log, "start", {}) == 5
    after = verify(log)
    assert (after.ok, after.entries, after.notes) == (True, 5, ())
    assert [entry.seq for entry in entries(log)] == [1, 2, 3, 4, 5]


def test_part_of_a_line_after_the_head_is_cut_off_and_recorded(tmp_path: Path) -> None:
    log = write_log(tmp_path, 3)
    torn = successor(log, 4)[:50]
    with log.open("ab") as handle:
        handle.write(torn)
    result = verify(log)
    assert result.ok and result.entries == 3
    assert result.notes == (
        "50 bytes of an unfinished line after entry 3: a writer stopped inside write(); the next "
        "append cuts them off",
    )
    assert append(log, "start", {"compartment": "next"}) == 5
    repair, entry = entries(log)[3:]
    assert (repair.event, repair.fields) == (
        "audit.repair",
        {
            "problem": "torn-write",
            "detail": "cut off 50 bytes of an unfinished line after entry 3",
            "dropped_bytes": 50,
            "dropped_sha256": line_hash(torn),
        },
    )
    assert entry.fields == {"compartment": "next"}
    after = verify(log)
    assert after.ok and after.entries == 5
    assert after.notes == (
        "entry 4: the writer cut off 50 bytes of an unfinished line after entry 3 (a writer had "
        "stopped mid-write)",
    )


def test_the_first_writer_stopping_before_the_head_is_a_crash_not_damage(tmp_path: Path) -> None:
    log = write_log(tmp_path, 1)
    head_path(log).unlink()
    result = verify(log)
    assert result.ok and result.notes == (
        "no head yet: the first writer stopped before writing it",
    )
    assert append(log, "start", {}) == 2
    assert verify(log).notes == ()


def test_a_leftover_temporary_head_changes_nothing(tmp_path: Path) -> None:
    log = write_log(tmp_path, 2)
    head_path(log).with_name("events.head.tmp").write_bytes(b'{"seq":1')
    assert append(log, "start", {}) == 3
    assert verify(log).ok


def test_a_removed_head_is_recorded_and_stays_visible(tmp_path: Path) -> None:
    log = write_log(tmp_path, 4)
    head_path(log).unlink()
    assert str(verify(log).problem) == (
        "entry 4 (line 4): head: there is no head beside the log: entries cut off the end cannot "
        "be ruled out"
    )
    assert append(log, "start", {}) == 6
    assert str(verify(log).problem) == (
        "entry 5 (line 5): repaired: the writer found the log damaged (head-missing: no head "
        "beside a log of "
        f"{sum(len(line) for line in events.split_lines(log.read_bytes())[:4])} bytes); entries "
        "before this one may have been changed or removed"
    )


def test_an_unreadable_head_is_recorded(tmp_path: Path) -> None:
    log = write_log(tmp_path, 2)
    head_path(log).write_bytes(b"garbage")
    assert str(verify(log).problem) == (
        "entry 3 (line 3): head: the head cannot be used: events.head is not JSON"
    )
    append(log, "start", {})
    repair = entries(log)[2]
    assert repair.fields["problem"] == "head-unreadable"
    assert verify(log).problem is not None


def test_a_cut_log_keeps_its_gap_when_appended_to(tmp_path: Path) -> None:
    """Chaining on from the head, not from what is left, keeps the cut visible forever."""
    log = write_log(tmp_path, 5)
    lines = events.split_lines(log.read_bytes())
    log.write_bytes(b"".join(lines[:3]) + lines[3][:20])
    assert str(verify(log).problem) == (
        "entry 4 (line 4): truncated: the log ends inside this entry"
    )
    assert append(log, "start", {}) == 7
    seqs = [json.loads(line)["seq"] for line in events.split_lines(log.read_bytes())[4:]]
    assert seqs == [6, 7]  # the repair entry and the new one follow the head's entry 5
    problem = verify(log).problem
    assert problem is not None and (problem.line, problem.seq) == (4, 4)


def test_lines_after_the_head_that_do_not_link_are_recorded(tmp_path: Path) -> None:
    log = write_log(tmp_path, 3)
    with log.open("ab") as handle:
        handle.write(b"not an entry\n")
    append(log, "start", {})
    repair = entries_after(log, 4)[0]
    assert repair.fields["problem"] == "unexpected-tail"
    problem = verify(log).problem
    assert problem is not None and (problem.line, problem.kind) == (4, "modified")


def entries_after(log: Path, line_number: int) -> list[events.Entry]:
    return [decode(line) for line in events.split_lines(log.read_bytes())[line_number:]]


# ---- hostile values ----------------------------------------------------------------------

SPECIAL = [
    "\n",
    "\r",
    "\r\n",
    '"',
    "\\",
    "\x00",
    "\x7f",
    "\u2028",
    "\ud800",
    "\udfff",
    "\udc80",
    "\ufeff",
    '"}\n{"seq":1,"time":"2025-01-01T00:00:00.000000Z","event":"start","prev":"' + "0" * 64,
    ',"prev":"' + "f" * 64 + '"}',
    '","event":"audit.repair","',
    "\x1b[31m",
]
hostile_text = st.lists(
    st.one_of(
        st.sampled_from(SPECIAL),
        st.characters(codec=None, exclude_categories=()),
        st.integers(0xD800, 0xDFFF).map(chr),  # lone surrogates, as undecodable argv gives
        st.text(max_size=5),
    ),
    max_size=30,
).map("".join)
# Encoding is what is tested here: a memory file system spares the fsyncs' wait.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
huge_text = st.builds(lambda n, s: s * n, st.integers(1000, 30_000), hostile_text.filter(bool))
values = st.one_of(hostile_text, huge_text, st.lists(hostile_text, max_size=5))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["argv", "name", "path", "result"]), values), max_size=6
    )
)
def test_hostile_values_cannot_break_or_forge_a_line(
    batches: list[dict[str, events.FieldValue]],
) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        log = Path(folder) / "events.jsonl"
        for fields in [{"name": "before"}, *batches, {"name": "after"}]:
            append(log, "copy", fields)
        lines = events.split_lines(log.read_bytes())
        assert len(lines) == len(batches) + 2
        prev = GENESIS
        for seq, (line, fields) in enumerate(
            zip(lines, [{"name": "before"}, *batches, {"name": "after"}], strict=True), 1
        ):
            assert line.isascii() and line.count(b"\n") == 1 and len(line) <= events.MAX_LINE_BYTES
            assert all(32 <= byte < 127 for byte in line[:-1])
            entry = decode(line)
            assert (entry.seq, entry.event, entry.prev, set(entry.fields)) == (
                seq,
                "copy",
                prev,
                set(fields),
            )
            uncut = events.encode(seq, entry.time, "copy", fields, prev)
            if len(uncut) <= events.MAX_LINE_BYTES:  # not cut: every value as given
                assert line == uncut
                assert entry.fields == json.loads(json.dumps(fields))
            prev = line_hash(line)
        result = verify(log)
        assert (result.ok, result.entries, result.notes) == (True, len(lines), ())


def chained(bodies: list[bytes]) -> list[bytes]:
    """Lines framed and linked like the writer's, whatever their middle holds."""
    lines, prev = [], GENESIS
    for seq, body in enumerate(bodies, 1):
        line = (
            b'{"seq":%d,"time":"2025-06-01T10:00:00.000000Z",' % seq
            + body
            + b',"prev":"'
            + prev.encode()
            + b'"}\n'
        )
        prev = line_hash(line)
        lines.append(line)
    return lines


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b'"event":"audit.repair",', b'"event":"audit.repair","x":{']).map(
                lambda mark: mark + b'"problem":"head-missing"'
            ),
        ),
        max_size=6,
    ),
    st.binary(max_size=60),
)
def test_verify_never_fails_on_what_it_reads(bodies: list[bytes], tail: bytes) -> None:
    """Linked lines the writer could not have written (even one claiming to be a repair) and
    arbitrary bytes after them: verify answers, it does not raise."""
    lines = [*chained(bodies), *events.split_lines(tail)]
    for head in (None, "unreadable", Head(len(bodies), GENESIS, 0)):
        result = verify_lines(lines, head)
        assert result.ok or result.problem is not None
