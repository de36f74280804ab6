"""A log server's received copies become append-only (chattr +a) on a file system that has the
flag: root's processes can then add to them, not change, cut or remove what they hold."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.test_cli import qnix
from tests.conftest import need


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    received = tmp_path / "received"
    received.mkdir()
    try:
        yield received
    finally:  # the flag outlives the test otherwise, and the folder could not be removed
        for path in received.iterdir():
            subprocess.run([need("chattr"), "-a", str(path)], check=False)


def attempts(path: Path) -> dict[str, bool]:
    """Which of the ways to rewrite a copy work (each on its own copy of the content)."""
    results = {}
    for name, attempt in {
        "truncate": lambda: path.open("r+b").truncate(0),
        "overwrite": lambda: path.open("r+b").write(b"X"),
        "rename": lambda: path.rename(path.with_suffix(".moved")),
        "unlink": path.unlink,
    }.items():
        content = path.read_bytes()
        try:
            attempt()
        except PermissionError:
            results[name] = False
        else:
            results[name] = True
            moved = path.with_suffix(".moved")
            if moved.exists():
                moved.rename(path)
            path.write_bytes(content)
    return results


def test_the_received_copies_can_only_grow(folder: Path) -> None:
    copy = folder / "ws-1.log"
    copy.write_bytes(b"<109>1 ... entry 1\n")
    (folder / "sub").mkdir()
    # The control: without the flag, root rewrites a copy every way.
    assert attempts(copy) == {"truncate": True, "overwrite": True, "rename": True, "unlink": True}

    result = qnix("audit", "protect-received", str(folder))
    assert (result.returncode, result.stdout) == (0, f"{folder}: 1 files append-only\n")
    lsattr = subprocess.run([need("lsattr"), str(copy)], capture_output=True, text=True, check=True)
    assert "a" in lsattr.stdout.split()[0]
    assert attempts(copy) == {
        "truncate": False,
        "overwrite": False,
        "rename": False,
        "unlink": False,
    }
    with copy.open("ab") as appending:  # what rsyslog does
        appending.write(b"<109>1 ... entry 2\n")
    assert copy.read_bytes() == b"<109>1 ... entry 1\n<109>1 ... entry 2\n"
    # Running again (the timer does, every minute) changes nothing.
    again = qnix("audit", "protect-received", str(folder))
    assert again.returncode == 0
    assert os.stat(copy).st_size == 38
