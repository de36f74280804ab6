"""A persistent compartment's state at rest: versioned snapshots of its home.

The state folder is the compartment's home under the state root
(`<state root>/compartments/<name>/home`, owned by its host uid, 0700). Its snapshots live beside
it in `<state root>/compartments/<name>/snapshots/` (root only, 0700):

    000007-20250612T101530Z-stop.tar.age     one snapshot: id 7, taken at a stop
    000008-20250612T101702Z-manual.snap      a btrfs snapshot
    latest -> 000008-20250612T101702Z-manual.snap

* Where the home is a btrfs subvolume (qnix apply makes it one on btrfs), a snapshot is a
  read-only btrfs snapshot: instant, copy-on-write, one point in time; it is protected at rest
  like the home, by the disk's encryption. Anywhere else it is a copy: a tar stream (PAX) of the
  folder, encrypted with `age` to the host's recipient (the public key of the host identity:
  `--identity FILE`, QNIX_AGE_IDENTITY, or /etc/qnix/host.agekey; see qnix.runtime.secrets).
  The plaintext never touches a disk: the tar goes to `age` through a FIFO in memory.
* The tree is read through file descriptors opened with O_NOFOLLOW relative to their folder, so
  a symlink is stored as a symlink and never followed, even if the compartment swaps a file for
  one while it is read (`--force`). Other file systems mounted inside, FIFOs, sockets and device
  nodes are left out. Hard links within the folder stay hard links.
* One is taken at every stop of a persistent compartment and on demand; the spec's
  `snapshots = N` keeps the latest N (0: none at stop, nothing removed).
* Atomic: each operation works in a temporary folder `snapshots/.tmp-<random>/` (the FIFO, the
  ciphertext being written, the next `latest` link); the ciphertext is fsynced, renamed to its
  final name (never over another), the folder fsynced, then `latest` is replaced by a rename.
  Only names of the final form are snapshots, so a crash never shows a partial one; the next
  snapshot, restore or `qnix gc` removes what a crash left.
* Restore makes a writable snapshot of a btrfs snapshot, or decrypts and unpacks a copy, into
  `.restore-<random>/` beside the home. Unpacking refuses any member that could write outside
  it (absolute names, `..`, a path through a link or a file, a hard link to anything but an
  earlier file of the archive, device nodes, FIFOs, duplicates), and what it writes is owned
  by the compartment's host uid, without setuid, setgid or sticky bits. Restore keeps the current
  state as a snapshot first and then swaps the two folders with one renameat2(RENAME_EXCHANGE).
  Symlinks are restored as they were stored, whatever they point at (inside the compartment an
  absolute link points into its own view): nothing here ever follows one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qnix.audit import events
from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime import btrfs
from qnix.runtime.archives import Diff, Entry, compare, tree_manifest, walk_tree
from qnix.runtime.files import atomic_write
from qnix.runtime.live import (
    await_started,
    compartment_of,
    host_identity,
    live_workstation,
    locked,
    require_live,
)
from qnix.runtime.paths import PathError, RuntimePaths, is_name
from qnix.runtime.snapshots import (
    Snapshot,
    SnapshotStore,
    exchange,
    fsync_dir,
    message_of,
    remove_snapshot_path,
    syncfs,
)

if TYPE_CHECKING:
    from qnix.spec.model import Compartment, Workstation

log = logging.getLogger("qnix.state")

SNAPSHOT_DIR = "snapshots"
RESTORE_PREFIX = ".restore-"

# ---- a compartment's state -----------------------------------------------------------------------


def store_of(paths: RuntimePaths, name: str) -> SnapshotStore:
    try:
        return SnapshotStore(paths.state_dir(name) / SNAPSHOT_DIR)
    except PathError as exc:
        raise QnixError(str(exc)) from exc


def recipients_of(identity: Path) -> tuple[str, ...]:
    """The public keys of the host identity: what snapshots are encrypted to."""
    keygen = require_tool("age-keygen", "age")
    result = run([keygen, "-y", str(identity)], timeout=30)
    found = tuple(line.strip() for line in result.stdout.splitlines() if line.strip())
    if not found:
        raise QnixError(f"{identity} holds no age identity")
    return found


def _host_key(identity: str | Path | None) -> Path:
    from qnix.runtime.secrets import require_identity

    return require_identity(identity)


def remember_recipient(paths: RuntimePaths) -> bool:
    """Keep the host identity's public key under the state root (`paths.recipient_file`), if
    the identity is at hand: snapshots are then encrypted to it by any stop, also by one
    without the identity (`qnix down` from a shell without QNIX_AGE_IDENTITY). True if the
    file changed. Called by apply, boot and start, where the identity is first available."""
    from qnix.runtime.secrets import identity_path

    key = identity_path()
    if not key.is_file() or not os.access(key, os.R_OK):
        return False
    try:
        text = "".join(f"{recipient}\n" for recipient in recipients_of(key))
    except QnixError as exc:  # a start that needs the identity says so itself
        log.warning("cannot read the host's age recipient: %s", exc.message)
        return False
    with contextlib.suppress(FileNotFoundError):
        if paths.recipient_file.read_text() == text:
            return False
    atomic_write(paths.recipient_file, text.encode(), 0o644)
    return True


def snapshot_recipients(paths: RuntimePaths, identity: str | Path | None) -> tuple[str, ...]:
    """What an age snapshot is encrypted to: the public key of `identity` when one is named,
    else the recorded one (`remember_recipient`), else that of the host identity at hand."""
    if identity is None:
        with contextlib.suppress(FileNotFoundError):
            recorded = paths.recipient_file.read_text().split()
            if recorded:
                return tuple(recorded)
    return recipients_of(_host_key(identity))


def _persistent(ws: Workstation, name: str) -> Compartment:
    compartment = compartment_of(ws, name)
    if compartment.persistence != "persistent":
        raise QnixError(f"{name} is disposable: it keeps no state to snapshot")
    return compartment


def _require_stopped(paths: RuntimePaths, name: str, hint: str) -> None:
    """Refuse (with `hint`) while `name` runs or starts. The caller holds the lock."""
    from qnix.runtime.quickrun import running_state

    await_started(paths, name)
    if running_state(paths, name) is not None:
        raise QnixError(f"{name} is running", hint=hint)


def _take(
    paths: RuntimePaths, name: str, keep: int, reason: str, identity: str | Path | None
) -> Snapshot:
    home = paths.home(name)
    if not home.is_dir():
        raise QnixError(f"{name} has no state folder {home}", hint="qnix apply makes it")
    # A btrfs snapshot is not encrypted by qnix: it needs no host key.
    recipients = () if btrfs.is_subvolume(home) else snapshot_recipients(paths, identity)
    taken = store_of(paths, name).take(home, recipients, reason, keep)
    events.record(
        paths,
        "snapshot",
        compartment=name,
        reason=reason,
        snapshot=taken.id,
        **taken.recorded(),
        result="ok",
    )
    return taken


def _record_failure(paths: RuntimePaths, event: str, name: str, exc: BaseException) -> None:
    try:
        events.record(paths, event, compartment=name, result=f"error: {message_of(exc)}")
    except Exception as failure:
        log.warning("%s: cannot record the %s event: %s", name, event, message_of(failure))


def snapshot(
    paths: RuntimePaths, name: str, *, identity: str | Path | None = None, force: bool = False
) -> Snapshot:
    """Snapshot a stopped compartment's state now (a running one with `force`)."""
    from qnix.runtime.net import require_root

    require_root()
    with locked(paths):
        compartment = _persistent(require_live(paths), name)
        if not force:
            _require_stopped(
                paths,
                name,
                f"its files may be half-written: qnix stop {name} (which takes a snapshot), "
                "or --force to take it as it is",
            )
        try:
            return _take(paths, name, compartment.snapshots, "manual", identity)
        except Exception as exc:
            _record_failure(paths, "snapshot", name, exc)
            raise


def snapshot_after_stop(paths: RuntimePaths, name: str) -> Snapshot | None:
    """The snapshot taken when a persistent compartment has stopped. Never raises: the stop
    is done either way; a failure is an audit event and a warning. The caller holds the lock."""
    try:
        if not paths.home(name).is_dir():
            return None  # a disposable (or state removed): nothing to keep, no spec to parse
        ws = live_workstation(paths)
        compartment = ws.compartments.get(name) if ws is not None else None
        if compartment is None or compartment.persistence != "persistent":
            return None
        if compartment.snapshots == 0:
            return None
        return _take(paths, name, compartment.snapshots, "stop", None)
    except Exception as exc:
        log.warning(
            "%s: stopped, but its state could not be snapshotted: %s", name, message_of(exc)
        )
        _record_failure(paths, "snapshot", name, exc)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Restored:
    restored: Snapshot
    previous: Snapshot | None  # the state before, kept as a snapshot
    entries: int


def restore(
    paths: RuntimePaths,
    name: str,
    snapshot_id: int | None = None,
    *,
    identity: str | Path | None = None,
) -> Restored:
    """Make a stopped compartment's state snapshot `snapshot_id` (the latest by default);
    the state it had is kept as a snapshot first."""
    from qnix.runtime.net import require_root

    require_root()
    with locked(paths):
        ws = require_live(paths)
        compartment = _persistent(ws, name)
        _require_stopped(paths, name, f"qnix stop {name} first: a restore swaps its whole home")
        store = store_of(paths, name)
        chosen = store.find(snapshot_id, name)
        host = host_identity(ws, name)
        try:
            done = _restore(paths, name, store, chosen, identity, (host.uid, host.gid))
        except Exception as exc:
            _record_failure(paths, "restore", name, exc)
            raise
        store.prune(compartment.snapshots)
        events.record(
            paths,
            "restore",
            compartment=name,
            snapshot=chosen.id,
            previous=done.previous.id if done.previous else None,
            result="ok",
        )
        return done


def _remove_restores(state_dir: Path) -> list[str]:
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(state_dir)):
            if entry.startswith(RESTORE_PREFIX):
                remove_snapshot_path(state_dir / entry)
                removed.append(entry)
    return removed


def _restore(
    paths: RuntimePaths,
    name: str,
    store: SnapshotStore,
    chosen: Snapshot,
    identity: str | Path | None,
    owner: tuple[int, int],
) -> Restored:
    state_dir = paths.state_dir(name)
    home = paths.home(name)
    _remove_restores(state_dir)
    workspace = Path(tempfile.mkdtemp(dir=state_dir, prefix=RESTORE_PREFIX))
    staging = workspace / "home"
    try:
        if chosen.kind == "btrfs":
            btrfs.snapshot(chosen.path, staging, readonly=False)
            entries = _own_tree(staging, owner)
        else:
            if btrfs.on_btrfs(state_dir):
                btrfs.create(staging)  # so that later snapshots are btrfs snapshots
            else:
                staging.mkdir()
            entries = store.unpack(chosen, _host_key(identity), staging, owner)
        os.chown(staging, *owner)
        staging.chmod(0o700)
        syncfs(staging)
        previous = None
        if home.is_dir():
            subvolume = btrfs.is_subvolume(home)
            recipients = () if subvolume else recipients_of(_host_key(identity))
            previous = store.take(home, recipients, "pre-restore", keep=0)
            exchange(staging, home)
        else:
            os.rename(staging, home)
        fsync_dir(state_dir)
    finally:
        remove_snapshot_path(workspace)  # after the swap: the state before
    return Restored(chosen, previous, entries)


def _own_tree(folder: Path, owner: tuple[int, int]) -> int:
    """Give everything under `folder` to `owner` (a snapshot made under another host uid); the
    number of entries. Nothing is followed."""
    entries = 0
    for found in walk_tree(folder):
        entries += 1
        if (found.info.st_uid, found.info.st_gid) != owner:
            os.chown(folder / found.name, *owner, follow_symlinks=False)
    return entries


def diff(
    paths: RuntimePaths,
    name: str,
    first: int | None = None,
    second: int | None = None,
    *,
    identity: str | Path | None = None,
) -> Diff:
    """From snapshot `first` (the latest by default) to snapshot `second`, or to the live
    folder when `second` is None."""
    from qnix.runtime.net import require_root

    require_root()
    with locked(paths):
        store = store_of(paths, name)

        def manifest(snapshot: Snapshot) -> dict[str, Entry]:
            key = _host_key(identity) if snapshot.kind == "age" else None
            return store.manifest(snapshot, key)

        before = manifest(store.find(first, name))
        if second is None:
            home = paths.home(name)
            if not home.is_dir():
                raise QnixError(f"{name} has no state folder {home}")
            after = tree_manifest(home)
        else:
            after = manifest(store.find(second, name))
    return compare(before, after)


@dataclasses.dataclass(frozen=True, slots=True)
class Listed:
    id: int
    time: str
    reason: str
    kind: str  # age or btrfs
    size: int | None  # of an age snapshot's ciphertext
    sha256: str | None  # of an age snapshot's ciphertext
    uuid: str | None  # of a btrfs snapshot
    latest: bool
    kept: bool  # within the spec's retention; False: the next snapshot removes it

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def listing(paths: RuntimePaths, name: str) -> list[Listed]:
    """Snapshots of `name`, oldest first, with the hash of each ciphertext (the UUID of each
    btrfs snapshot)."""
    from qnix.runtime.net import require_root

    require_root()  # the snapshots folder is root's alone
    store = store_of(paths, name)
    ws = live_workstation(paths)
    compartment = ws.compartments.get(name) if ws is not None else None
    keep = compartment.snapshots if compartment is not None else 0
    found = store.snapshots()
    latest = store.latest()
    kept = {s.id for s in found[-keep:]} if keep > 0 else {s.id for s in found}
    rows = []
    for snapshot in found:
        try:
            fingerprint = snapshot.fingerprint()
        except (FileNotFoundError, QnixError):
            continue  # removed meanwhile
        is_latest = latest is not None and latest.id == snapshot.id
        age = snapshot.kind == "age"
        rows.append(
            Listed(
                snapshot.id,
                snapshot.time,
                snapshot.reason,
                snapshot.kind,
                snapshot.size,
                fingerprint if age else None,
                None if age else fingerprint,
                is_latest,
                snapshot.id in kept or is_latest,
            )
        )
    return rows


def remove_leftovers(paths: RuntimePaths) -> list[str]:
    """What interrupted snapshots and restores left, removed (`qnix gc`, under the lock)."""
    changes = []
    try:
        names = sorted(os.listdir(paths.compartments_state))
    except FileNotFoundError:
        return []
    for name in names:
        if not is_name(name):
            continue
        for entry in _remove_restores(paths.state_dir(name)):
            changes.append(f"{name}: removed an unfinished restore ({entry})")
        for entry in store_of(paths, name).remove_temporaries():
            changes.append(f"{name}: removed an unfinished snapshot ({entry})")
    return changes
