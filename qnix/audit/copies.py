"""Several receivers' copies of one host's log, merged into one chain to verify.

A host that forwards to an HA pair sends every entry to both; a receiver that was down or
restarted may miss some, and a sender that crashed may send some twice. Merged by `seq`, exact
repeats dropped, the copies give back the host's chain wherever at least one copy holds each
entry; an entry that no copy holds is lost, and said so. Where copies disagree on an entry (one
receiver's file was changed), the line the next entry links to is kept and the disagreement
noted; the chain's own verification then judges the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qnix.audit.events import decode, line_hash


@dataclass(frozen=True, slots=True)
class Merged:
    """The merged chain, oldest first; how many lines were repeats; the runs of seq that no
    copy holds (first, last); the seqs the copies disagree on."""

    lines: tuple[bytes, ...]
    repeats: int
    lost: tuple[tuple[int, int], ...]
    disagreements: tuple[int, ...]


class NotAnEntry(ValueError):
    """A line of a copy is not an entry qnix writes (so it cannot be placed by its seq)."""

    def __init__(self, copy: int, line: int, reason: str) -> None:
        super().__init__(f"copy {copy + 1}, line {line}: not an entry: {reason}")
        self.copy = copy
        self.line = line


def merge_copies(copies: Sequence[Sequence[bytes]]) -> Merged:
    candidates: dict[int, list[bytes]] = {}
    total = 0
    for copy_index, lines in enumerate(copies):
        for number, line in enumerate(lines, 1):
            total += 1
            try:
                seq = decode(line).seq
            except ValueError as exc:
                raise NotAnEntry(copy_index, number, str(exc)) from None
            known = candidates.setdefault(seq, [])
            if line not in known:
                known.append(line)
    unique = sum(len(lines) for lines in candidates.values())
    chosen: list[bytes] = []
    disagreements: list[int] = []
    lost: list[tuple[int, int]] = []
    last = max(candidates, default=0)
    seq = 1
    while seq <= last:
        if seq not in candidates:
            end = seq
            while end + 1 not in candidates:
                end += 1
            lost.append((seq, end))
            seq = end + 1
            continue
        options = candidates[seq]
        if len(options) > 1:
            disagreements.append(seq)
            following = {decode(line).prev for line in candidates.get(seq + 1, [])}
            linked = [line for line in options if line_hash(line) in following]
            options = linked or options
        chosen.append(options[0])
        seq += 1
    return Merged(tuple(chosen), total - unique, tuple(lost), tuple(disagreements))
