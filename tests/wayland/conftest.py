"""The real protocol files, read once for every test of the Wayland filter."""

from __future__ import annotations

import pytest

from qnix.runtime.waylandproxy import load_protocols
from qnix.wayland.protocol import Protocols


@pytest.fixture(scope="session")
def protocols() -> Protocols:
    return load_protocols({})
