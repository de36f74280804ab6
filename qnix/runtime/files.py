"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from qnix.errors import QnixError


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file, fsync, rename.

    The file is written unnamed (O_TMPFILE) and named only just before the rename, so a
    process killed while writing leaves nothing behind; killed between the naming and the
    rename (Linux cannot link an unnamed file over another), it leaves its temporary name,
    which `temporaries_of` finds. Where the file system has no unnamed files, a named
    temporary file it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_unnamed(path, data, mode)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                _write_all(handle.fileno(), data, mode)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def temporaries_of(path: Path) -> list[Path]:
    """What atomic_write of `path` can leave when killed: `.NAME.<random>.tmp` beside it."""
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))


def tree_leftovers(target: Path) -> list[Path]:
    """What replace_tree of `target` can leave when killed: the new tree it was writing
    (`.NAME.new-*`) or the old one it had not removed yet (`.NAME.old-PID`)."""
    name = glob_escape(target.name)
    return sorted([*target.parent.glob(f".{name}.new-*"), *target.parent.glob(f".{name}.old-*")])


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write_all(fd: int, data: bytes, mode: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
    os.fchmod(fd, mode)


def _write_unnamed(path: Path, data: bytes, mode: int) -> str | None:
    """`data` in an unnamed file in `path`'s folder, then linked in beside it under a
    temporary name (returned); None if the file system cannot."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=directory)
        except OSError:
            return None
        try:
            _write_all(fd, data, mode)
            name = f".{path.name}.{os.urandom(6).hex()}.tmp"
            try:
                # linkat with AT_SYMLINK_FOLLOW (a dir_fd makes Python use linkat, not link).
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory, follow_symlinks=True)
            except OSError:
                return None
        finally:
            os.close(fd)
    finally:
        os.close(directory)
    return str(path.parent / name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_tree(target: Path, files: Mapping[str, bytes]) -> None:
    """Make `target` hold exactly `files` (relative path -> bytes).

    The tree is written beside the target and swapped in with two renames, so the target is
    never a mix of old and new files; files the new tree lacks are gone with the old one.
    """
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise QnixError(f"{target} exists and is not a folder", hint="choose another -o folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    for left in tree_leftovers(target):  # of a replacement killed before it finished
        shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    try:
        staging.chmod(0o755)
        for relative, data in files.items():
            if Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise QnixError(f"refusing to write outside the output folder: {relative}")
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o644)
        for directory in sorted({p.parent for p in staging.rglob("*")}, reverse=True):
            _fsync_dir(directory)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        staging.rename(target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def update_tree(target: Path, files: Mapping[str, bytes], stale: Iterable[str], last: str) -> None:
    """Write `files` (relative path -> bytes) into `target`, each atomically, `last` after all
    the others; before it, remove `stale` (what an earlier write put there that `files` no
    longer holds) and the folders that leaves empty. Anything else in `target` stays: a flake's
    flake.lock, its .git. A write killed half-way leaves the earlier `last` naming what is
    there, so the next write finds the stale files again."""
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise QnixError(f"{target} exists and is not a folder", hint="choose another -o folder")
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()

    def inside(relative: str) -> Path:
        path = target / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise QnixError(f"refusing to write outside the output folder: {relative}")
        if not path.parent.resolve().is_relative_to(root) or path.is_symlink():
            raise QnixError(
                f"refusing to write {relative}: a symbolic link in {target} leads out of it",
                hint="remove the link, or choose another -o folder",
            )
        return path

    for relative, data in sorted(files.items()):
        if relative != last:
            path = inside(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
    for relative in sorted(set(stale) - set(files)):
        path = inside(relative)
        path.unlink(missing_ok=True)
        for folder in path.relative_to(target).parents[:-1]:
            with contextlib.suppress(OSError):  # not empty: something else is in it
                (target / folder).rmdir()
    atomic_write(inside(last), files[last])


def draw_with_graphviz(dot_source: str, fmt: str, output: Path) -> None:
    """Render DOT text with graphviz into `output`, which appears only when complete."""
    from qnix.runner import require_tool, run

    dot = require_tool("dot", "graphviz")
    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=output.absolute().parent, prefix=f".{output.name}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        run([dot, f"-T{fmt}", "-o", tmp], input=dot_source, timeout=120)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
