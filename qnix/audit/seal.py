"""Forward-secure seals on the audit chain: a later root cannot rewrite what was sealed before.

The hash chain alone has no secret, so whoever can write the log can rewrite any entry and
recompute every later hash and the head. Seals add a secret that only moves forward, after
systemd-journald's Forward Secure Sealing (Marson & Poettering, "Practical Secure Logging:
Seekable Sequential Key Generators", 2013), built from HMAC-SHA256 alone:

* `qnix audit seal --init` draws a random 32-byte key k_0, the verification key. It is shown
  once (text and QR code) to be kept off the machine, and never stored.
* Keys form a one-way chain: k_{e+1} = HMAC-SHA256(k_e, EVOLVE). From k_e anyone can compute
  every later key, and no earlier one (that would invert HMAC-SHA256).
* Sealing epoch e appends an `audit.seal` entry to the chain with fields `epoch` = e and
  `tag` = HMAC-SHA256(k_e, "qnix audit seal v1" NUL e NUL seq NUL prev), where seq is the
  seal entry's own seq and prev the hash of the entry before it, which covers every earlier
  entry through the chain. Then the key file (`events.sealkey` beside the log, 0600) is
  replaced atomically by (e+1, k_{e+1}): k_e is gone from the machine.
* The verifier derives k_0, k_1, ... from the verification key and checks every seal in turn:
  epochs must run 0, 1, 2, ... without a gap, each tag must match. Someone holding k_c (root
  at a later time) can rewrite entries before the seal of epoch c-1 and recompute the hashes,
  but not the tags of epochs below c: the verifier finds the first seal that no longer
  matches. Dropping the seals from some point on (with everything after them) is found too,
  when the host's key file is at hand: its epoch says how many seals were made, and it must be
  k_epoch of this verification key.

Not seekable: the verifier computes the keys one after another, one HMAC an epoch (a seal every
15 minutes is 35,000 a year, a few tenths of a second), so nothing of the paper's seekable
generator is needed. Entries after the last seal are not proven (a root holding the current key
may have rewritten them); the verifier says which. A replaced key file's old blocks may survive
on a copy-on-write or flash file system until they are reused: like journald's, the scheme
assumes the file system does not give them back.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qnix.audit.events import (
    Entry,
    FieldValue,
    append,
    decode,
    is_hash,
    replace_file,
    split_lines,
)
from qnix.audit.verify import Problem, Verification

SEAL_EVENT = "audit.seal"
KEY_BYTES = 32
EVOLVE = b"qnix audit seal: evolve"
TAG_LABEL = b"qnix audit seal v1"
SEAL_MARK = b'"event":"' + SEAL_EVENT.encode() + b'"'


def seal_key_path(log: Path) -> Path:
    return log.with_suffix(".sealkey")


def evolve(key: bytes) -> bytes:
    return hmac.new(key, EVOLVE, hashlib.sha256).digest()


def key_at(verification_key: bytes, epoch: int) -> bytes:
    key = verification_key
    for _ in range(epoch):
        key = evolve(key)
    return key


def seal_tag(key: bytes, epoch: int, seq: int, prev: str) -> str:
    message = b"\0".join((TAG_LABEL, b"%d" % epoch, b"%d" % seq, prev.encode("ascii")))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def key_text(key: bytes) -> str:
    """The key as eight dash-separated groups of eight hex digits (to copy by hand)."""
    digits = key.hex()
    return "-".join(digits[i : i + 8] for i in range(0, len(digits), 8))


def parse_key_text(text: str) -> bytes:
    """A key as `key_text` writes it (dashes, spaces and case do not matter)."""
    digits = "".join(text.split()).replace("-", "").lower()
    if len(digits) != 2 * KEY_BYTES or not all(c in "0123456789abcdef" for c in digits):
        raise ValueError(f"a verification key is {2 * KEY_BYTES} hex digits")
    return bytes.fromhex(digits)


@dataclass(frozen=True, slots=True)
class SealKey:
    """The key of the next seal and its epoch, as the host keeps them."""

    epoch: int
    key: bytes

    def encode(self) -> bytes:
        return (json.dumps({"epoch": self.epoch, "key": self.key.hex()}) + "\n").encode()

    def evolved(self) -> SealKey:
        return SealKey(self.epoch + 1, evolve(self.key))


def read_seal_key(path: Path) -> SealKey | str | None:
    """The host's seal key; None if there is none; why it cannot be used otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror}"
    try:
        parsed = json.loads(raw)
        key = SealKey(parsed["epoch"], bytes.fromhex(parsed["key"]))
    except (ValueError, KeyError, TypeError):
        return f"{path.name} is not a seal key qnix wrote"
    if type(key.epoch) is not int or key.epoch < 0 or len(key.key) != KEY_BYTES:
        return f"{path.name} is not a seal key qnix wrote"
    return key


def seal_fields(key: SealKey, seq: int, prev: str) -> dict[str, FieldValue]:
    """The fields of the seal entry that lands at `seq` after the entry hashed `prev`."""
    return {"epoch": key.epoch, "tag": seal_tag(key.key, key.epoch, seq, prev)}


# ---- writing --------------------------------------------------------------------------------


class SealingError(Exception):
    """Sealing cannot go on: not set up, or the key file is damaged."""


def init(log: Path) -> tuple[bytes, int]:
    """Start sealing `log`: a new verification key, and the seq of the first seal (epoch 0),
    which seals everything already in the log. The key is returned once, never stored."""
    path = seal_key_path(log)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _SealLock(log):
        if path.exists():
            raise SealingError(f"{path} exists: this log is sealed already")
        verification_key = secrets.token_bytes(KEY_BYTES)
        seq = _seal_with(log, SealKey(0, verification_key))
    return verification_key, seq


def seal(log: Path) -> tuple[int, int]:
    """Seal everything in `log` so far with the current key, then evolve it: (epoch, seq)."""
    with _SealLock(log):
        key = read_seal_key(seal_key_path(log))
        if key is None:
            raise SealingError(f"{log} is not sealed: there is no {seal_key_path(log).name}")
        if isinstance(key, str):
            raise SealingError(key)
        if last_seal_epoch(log) == key.epoch:
            # A seal stopped after its entry but before replacing the key: finish that first.
            key = key.evolved()
            replace_file(seal_key_path(log), key.encode())
        return key.epoch, _seal_with(log, key)


def _seal_with(log: Path, key: SealKey) -> int:
    seq = append(log, SEAL_EVENT, {}, lambda seq, prev: seal_fields(key, seq, prev))
    replace_file(seal_key_path(log), key.evolved().encode())
    return seq


class _SealLock:
    """An exclusive lock on `events.seallock`: one seal at a time (the chain's own lock is
    taken inside, by `append`)."""

    def __init__(self, log: Path) -> None:
        self.path = log.with_suffix(".seallock")
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def last_seal_epoch(log: Path) -> int | None:
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return None
    at = data.rfind(SEAL_MARK)
    if at < 0:
        return None
    line = data[data.rfind(b"\n", 0, at) + 1 : data.find(b"\n", at) + 1]
    try:
        epoch = decode(line).fields.get("epoch")
    except ValueError:
        return None
    return epoch if type(epoch) is int else None


# ---- verifying ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SealVerification:
    """What the seals prove: every entry up to `proven_through` is as it was sealed (0: none);
    `unproven` entries came after the last good seal."""

    proven_through: int
    last_epoch: int | None
    unproven: tuple[int, int] | None
    problem: Problem | None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "proven_through": self.proven_through,
            "last_epoch": self.last_epoch,
            "unproven": None if self.unproven is None else list(self.unproven),
            "problem": None if self.problem is None else self.problem.to_json(),
            "notes": list(self.notes),
        }


@dataclass(frozen=True, slots=True)
class _Seal:
    line: int
    entry: Entry


def verify_seals(
    lines: Sequence[bytes],
    chain: Verification,
    verification_key: bytes,
    host_key: SealKey | str | None,
    *,
    host_key_checked: bool = True,
) -> SealVerification:
    """Check the seals in `lines` (the log `chain` is the verification of) with the
    verification key. Only the part of the chain that verified counts. `host_key`: the
    host's key file (None if there is none, or why it is unusable); with
    `host_key_checked=False` (a copy from elsewhere) it is not looked at."""
    intact = len(lines) if chain.problem is None else chain.problem.line - 1
    notes: list[str] = []
    seals: list[_Seal] = []
    for number, line in enumerate(lines[:intact], 1):
        if SEAL_MARK in line:
            try:
                entry = decode(line)
            except ValueError as exc:
                # The chain's cheap check links it, but it is not a line qnix writes.
                reason = f"not an entry qnix writes: {exc}"
                return SealVerification(0, None, None, Problem(number, number, "modified", reason))
            if entry.event == SEAL_EVENT:
                seals.append(_Seal(number, entry))
    proven, last_epoch = 0, None
    key, key_epoch = verification_key, 0
    total = chain.entries
    for found in seals:
        entry = found.entry
        epoch, tag = entry.fields.get("epoch"), entry.fields.get("tag")
        expected = 0 if last_epoch is None else last_epoch + 1
        if type(epoch) is not int or not isinstance(tag, str) or not is_hash(tag):
            return _failed(found, proven, last_epoch, "the seal has no epoch or tag", notes)
        if epoch != expected:
            reason = (
                f"seal of epoch {epoch} where epoch {expected} belongs: seals were removed or "
                "added, so the entries after the last good seal were rewritten"
            )
            return _failed(found, proven, last_epoch, reason, notes)
        while key_epoch < epoch:
            key, key_epoch = evolve(key), key_epoch + 1
        if not hmac.compare_digest(seal_tag(key, epoch, entry.seq, entry.prev), tag):
            first = proven + 2 if last_epoch is not None else 1
            reason = (
                f"the seal of epoch {epoch} does not match entries {first}-{entry.seq - 1}: "
                "one of them was rewritten and the hashes recomputed (or this is not the "
                "log's verification key)"
            )
            return _failed(found, proven, last_epoch, reason, notes, first)
        proven, last_epoch = entry.seq - 1, epoch
    problem = None
    if host_key_checked:
        problem = _host_key_problem(host_key, verification_key, last_epoch, proven)
        if problem is not None and problem.kind == "seal-unfinished":
            notes.append(problem.reason)
            # The key of the last seal is still on the host: that seal proves nothing.
            proven = seals[-2].entry.seq - 1 if len(seals) > 1 else 0
            problem = None
    else:
        notes.append("the host's seal key was not checked: seals cut off the end cannot be seen")
    last_seal = proven + 1 if last_epoch is not None else 0
    unproven = (last_seal + 1, total) if total > last_seal else None
    return SealVerification(proven, last_epoch, unproven, problem, tuple(notes))


def _failed(
    found: _Seal,
    proven: int,
    last_epoch: int | None,
    reason: str,
    notes: list[str],
    first: int | None = None,
) -> SealVerification:
    seq = found.entry.seq if first is None else first
    problem = Problem(found.line if first is None else first, seq, "sealed", reason)
    return SealVerification(proven, last_epoch, None, problem, tuple(notes))


def _host_key_problem(
    host_key: SealKey | str | None,
    verification_key: bytes,
    last_epoch: int | None,
    proven: int,
) -> Problem | None:
    after = proven + 2 if last_epoch is not None else 1
    if host_key is None:
        return Problem(
            after,
            after,
            "seal-key",
            "there is no seal key beside the log: seals cut off the end cannot be ruled out",
        )
    if isinstance(host_key, str):
        return Problem(after, after, "seal-key", f"the host's seal key cannot be used: {host_key}")
    if host_key.key != key_at(verification_key, host_key.epoch):
        return Problem(
            after,
            after,
            "seal-key",
            "the host's seal key does not come from this verification key",
        )
    sealed = 0 if last_epoch is None else last_epoch + 1
    if host_key.epoch == sealed:
        return None
    if last_epoch is not None and host_key.epoch == last_epoch:
        return Problem(
            after,
            after,
            "seal-unfinished",
            f"the seal of epoch {last_epoch} stopped before its key was replaced; the next "
            "seal replaces it",
        )
    last_missing = host_key.epoch - 1
    missing = f"epoch {sealed}" if last_missing == sealed else f"epochs {sealed}-{last_missing}"
    return Problem(
        after,
        after,
        "sealed",
        f"the seals of {missing} are missing (the host's key has been evolved past them): the "
        f"log was rewritten or cut after entry {proven}",
    )


def verify_log_seals(log: Path, chain: Verification, verification_key: bytes) -> SealVerification:
    """`verify_seals` for the log file at `log`, with the host's key file beside it."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        data = b""
    return verify_seals(
        split_lines(data), chain, verification_key, read_seal_key(seal_key_path(log))
    )
