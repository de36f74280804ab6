"""Forward-secure seals: a root that rewrites the past, hashes and head recomputed, is found.

Every attack is also run against the chain alone (the control): there it succeeds, `verify`
says intact; the seals are the one protection that finds it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.audit import events, seal
from qnix.audit.events import GENESIS, Head, decode, encode, line_hash, split_lines
from qnix.audit.seal import SealKey, evolve, key_at, seal_fields, verify_seals
from qnix.audit.verify import verify, verify_lines

QNIX = str(Path(sys.executable).with_name("qnix"))
TIME = "2025-06-01T10:00:00.000000Z"
VERIFY_KEY = bytes(range(32))

Retag = Callable[[int, int, str], str] | None


def build(count: int, seal_after: set[int], key: bytes = VERIFY_KEY) -> tuple[list[bytes], SealKey]:
    """A log of `count` ordinary entries with a seal after each entry numbered in
    `seal_after` (counting ordinary entries), and the host's key after the last seal."""
    lines: list[bytes] = []
    prev, host_key = GENESIS, SealKey(0, key)
    for number in range(1, count + 1):
        line = encode(len(lines) + 1, TIME, "run", {"compartment": "work", "n": number}, prev)
        lines.append(line)
        prev = line_hash(line)
        if number in seal_after:
            fields = seal_fields(host_key, len(lines) + 1, prev)
            line = encode(len(lines) + 1, TIME, seal.SEAL_EVENT, fields, prev)
            lines.append(line)
            prev = line_hash(line)
            host_key = host_key.evolved()
    return lines, host_key


def head_of(lines: list[bytes]) -> Head:
    return Head(len(lines), line_hash(lines[-1]), sum(map(len, lines)))


def rewrite(lines: list[bytes], seq: int, retag: Retag = None) -> list[bytes]:
    """Entry `seq` changed, and every later entry's prev recomputed, as a root with the log
    would; `retag(epoch, seq, prev)` gives a seal's new tag (None: the old tag is kept)."""
    out = lines[: seq - 1]
    prev = line_hash(out[-1]) if out else GENESIS
    for line in lines[seq - 1 :]:
        entry = decode(line)
        fields = dict(entry.fields)
        if entry.seq == seq:
            fields["compartment"] = "rewritten"
        if entry.event == seal.SEAL_EVENT and retag is not None:
            epoch = fields["epoch"]
            assert isinstance(epoch, int)
            fields["tag"] = retag(epoch, entry.seq, prev)
        new = encode(entry.seq, entry.time, entry.event, fields, prev)
        out.append(new)
        prev = line_hash(new)
    return out


def check(
    lines: list[bytes], host_key: SealKey | None, key: bytes = VERIFY_KEY
) -> seal.SealVerification:
    chain = verify_lines(lines, head_of(lines))
    assert chain.ok, chain.problem  # the control: the chain alone finds nothing
    return verify_seals(lines, chain, key, host_key)


def test_an_untouched_sealed_log_is_proven_up_to_its_last_seal() -> None:
    lines, host_key = build(30, {10, 20})
    result = check(lines, host_key)
    assert result.problem is None
    # Seals stand at entries 11 and 22; entries 23-32 came after the last one.
    assert (result.proven_through, result.last_epoch, result.unproven) == (21, 1, (23, 32))


def test_a_rewrite_before_the_last_seal_is_found() -> None:
    lines, host_key = build(30, {10, 20})
    result = check(rewrite(lines, 15), host_key)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (12, "sealed")
    assert "epoch 1 does not match entries 12-21" in result.problem.reason
    assert result.proven_through == 10


def test_a_rewrite_after_the_last_seal_is_unproven_not_intact() -> None:
    lines, host_key = build(30, {10, 20})
    result = check(rewrite(lines, 25), host_key)
    assert result.problem is None
    assert result.proven_through == 21
    assert result.unproven == (23, 32)


def test_seals_dropped_with_the_rest_of_the_log_are_found_by_the_hosts_key() -> None:
    lines, host_key = build(30, {10, 20})
    cut = lines[:15]  # entry 15 on, the epoch-1 seal with it, gone (a rewrite from there)
    result = check(cut, host_key)
    assert result.problem is not None
    assert "the seals of epoch 1 are missing" in result.problem.reason
    # Control: without the host's key the copy is proven through entry 10 and no further.
    chain = verify_lines(cut, head_of(cut))
    copy = verify_seals(cut, chain, VERIFY_KEY, None, host_key_checked=False)
    assert (copy.problem, copy.proven_through) == (None, 10)


def test_a_missing_or_foreign_host_key_is_a_problem() -> None:
    lines, host_key = build(10, {5})
    assert check(lines, None).problem is not None
    foreign = SealKey(host_key.epoch, key_at(bytes(32), host_key.epoch))
    problem = check(lines, foreign).problem
    assert problem is not None and problem.kind == "seal-key"


def test_another_verification_key_proves_nothing() -> None:
    lines, host_key = build(10, {5})
    result = check(lines, host_key, key=bytes(32))
    assert result.problem is not None and result.proven_through == 0


def test_a_seal_stopped_before_its_key_was_replaced_proves_nothing_yet() -> None:
    lines, host_key = build(20, {5, 10})
    stale = SealKey(host_key.epoch - 1, key_at(VERIFY_KEY, host_key.epoch - 1))
    result = check(lines, stale)
    assert result.problem is None
    assert result.proven_through == 5  # the epoch-0 seal; the epoch-1 key is still on disk
    assert "stopped before its key was replaced" in result.notes[0]


def test_a_seal_that_is_not_a_canonical_entry_is_refused_not_trusted() -> None:
    lines, host_key = build(5, {5})
    lines[-1] = lines[-1].replace(b'"epoch":0', b'"epoch": 0')  # the chain's framing holds
    result = check(lines, host_key)  # the control inside: the chain alone finds nothing
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (6, "modified")
    assert result.proven_through == 0


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=3, max_value=40),
    data=st.data(),
)
def test_the_current_key_cannot_make_a_valid_earlier_seal(count: int, data: st.DataObject) -> None:
    seal_after = data.draw(st.sets(st.integers(min_value=1, max_value=count), min_size=1))
    lines, host_key = build(count, seal_after)
    seals = [decode(line) for line in lines if seal.SEAL_MARK in line]
    last_seal = seals[-1].seq
    target = data.draw(st.integers(min_value=1, max_value=last_seal - 1))
    if decode(lines[target - 1]).event == seal.SEAL_EVENT:
        target -= 1  # rewrite an ordinary entry (a seal before it still covers it)
    if target < 1:
        return
    # The attacker holds the current key, and so every later one: he tries each on every seal.
    held = [host_key.key]
    for _ in range(3):
        held.append(evolve(held[-1]))
    pick = data.draw(st.integers(min_value=-1, max_value=len(held) - 1))

    def retag(epoch: int, seq: int, prev: str) -> str:
        key = held[pick]
        return seal.seal_tag(key, epoch, seq, prev)

    forged = rewrite(lines, target, None if pick < 0 else retag)
    result = check(forged, host_key)  # the control inside: the chain verifies
    assert result.problem is not None
    assert result.proven_through < target
    # No key the attacker holds gives the tag of any real seal.
    for entry in seals:
        epoch = entry.fields["epoch"]
        assert isinstance(epoch, int)
        tags = {seal.seal_tag(key, epoch, entry.seq, entry.prev) for key in held}
        assert entry.fields["tag"] not in tags


# ---- on disk, through the command -----------------------------------------------------------


def qnix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QNIX, *args], capture_output=True, text=True, timeout=60, check=False)


def append_entries(log: Path, count: int) -> None:
    for number in range(count):
        events.append(log, "run", {"compartment": "work", "n": number})


def test_seal_init_shows_the_key_once_and_verify_proves_the_sealed_part(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "events.jsonl"
    append_entries(log, 5)
    init = qnix("audit", "seal", "--init", "--log", str(log))
    assert init.returncode == 0, init.stderr
    key = init.stdout.splitlines()[2].strip()
    assert seal.parse_key_text(key) != key_at(seal.parse_key_text(key), 1)
    assert "█" in init.stdout  # the QR code
    assert key.replace("-", "") not in (log.parent / "events.sealkey").read_text()
    assert oct((log.parent / "events.sealkey").stat().st_mode & 0o777) == "0o600"
    again = qnix("audit", "seal", "--init", "--log", str(log))
    assert again.returncode == 1 and "sealed already" in again.stderr

    append_entries(log, 4)
    sealed = qnix("audit", "seal", "--log", str(log))
    assert sealed.stdout == f"{log}: sealed through entry 10 (entry 11, epoch 1)\n"
    append_entries(log, 2)
    result = qnix("audit", "verify", "--log", str(log), "--verify-key", key)
    assert (result.returncode, result.stdout) == (
        0,
        f"{log}: proven through entry 10 (sealed by entry 11, epoch 1), of 13\n"
        f"{log}: entries 12-13 unproven: written after the last seal\n",
    )

    # A root rewrites entry 3 and recomputes every hash and the head.
    lines = rewrite(split_lines(log.read_bytes()), 3)
    log.write_bytes(b"".join(lines))
    events.replace_file(events.head_path(log), head_of(lines).encode())
    assert qnix("audit", "verify", "--log", str(log)).returncode == 0  # the control
    found = qnix("audit", "verify", "--log", str(log), "--verify-key", key)
    assert found.returncode == 1
    assert found.stdout.startswith(
        f"{log}: NOT intact: first bad entry entry 1 (line 1): sealed: the seal of epoch 0 "
        "does not match entries 1-5"
    )
    assert f"{log}: proven through no entry: there is no good seal\n" in found.stdout


def test_seal_without_init_says_how_to_start(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "events.jsonl"
    append_entries(log, 1)
    result = qnix("audit", "seal", "--log", str(log))
    assert result.returncode == 1
    assert "is not sealed" in result.stderr and "qnix audit seal --init" in result.stderr


def test_a_seal_interrupted_before_the_key_was_replaced_is_finished_next_time(
    tmp_path: Path,
) -> None:
    log = tmp_path / "audit" / "events.jsonl"
    append_entries(log, 2)
    verification_key, _ = seal.init(log)
    key_file = seal.seal_key_path(log)
    before = key_file.read_bytes()
    seal.seal(log)  # epoch 1, then the key moves to epoch 2 ...
    key_file.write_bytes(before)  # ... which a crash in between would not have done
    assert seal.seal(log) == (2, 5)  # epoch 1's key is evolved first, never used again
    chain = verify(log)
    result = seal.verify_log_seals(log, chain, verification_key)
    assert (result.problem, result.proven_through, result.last_epoch) == (None, 4, 2)


def test_a_syslog_servers_copy_is_checked_with_the_key_too(tmp_path: Path) -> None:
    """The seals travel in the chain: a receiver's copy is proven as far as its last seal
    (there is no key file there to show seals cut off the end, and verify says so)."""
    log = tmp_path / "audit" / "events.jsonl"
    append_entries(log, 3)
    key, _ = seal.init(log)
    append_entries(log, 2)
    exported = qnix("audit", "export", "--log", str(log), "--format", "rfc5424")
    copy = tmp_path / "received.log"
    copy.write_text(exported.stdout)
    text = seal.key_text(key)
    proven = subprocess.run(
        [QNIX, "audit", "verify", "--format", "rfc5424", "--log", str(copy), "--verify-key", "-"],
        input=text + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proven.returncode, proven.stdout.splitlines()[:2]) == (
        0,
        [
            f"{copy}: proven through entry 3 (sealed by entry 4, epoch 0), of 6",
            f"{copy}: entries 5-6 unproven: written after the last seal",
        ],
    )
    assert "seals cut off the end cannot be seen" in proven.stdout
    # The control: a copy whose entry 2 was rewritten, hashes recomputed, verifies without
    # the key and fails with it.
    lines = rewrite(split_lines(log.read_bytes()), 2)
    forged = tmp_path / "forged.jsonl"
    forged.write_bytes(b"".join(lines))
    chain_only = qnix("audit", "verify", "--log", str(forged), "--log", str(forged))
    assert chain_only.returncode == 0, chain_only.stdout
    with_key = qnix(
        "audit", "verify", "--log", str(forged), "--log", str(forged), "--verify-key", text
    )
    assert with_key.returncode == 1
    assert "sealed: the seal of epoch 0 does not match entries 1-3" in with_key.stdout
