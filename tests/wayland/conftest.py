"""The real protocol files, read once for every test of the Wayland filter; a headless sway
per test module."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.runtime.waylandproxy import load_protocols
from qnix.wayland.protocol import Protocols
from tests.wayland.desktop import Desktop


@pytest.fixture(scope="session")
def protocols() -> Protocols:
    return load_protocols({})


@pytest.fixture(scope="module")
def desktop() -> Iterator[Desktop]:
    # Not below pytest's own temporary folder: the test user could not enter it.
    running = Desktop(Path(tempfile.mkdtemp(prefix="qnix-gui-")))
    try:
        yield running
    finally:
        running.close()
