"""The real protocol files, read once for every test of the Wayland filter."""

from __future__ import annotations

import pytest

from qnix.wayland import protocol
from qnix.wayland.protocol import Protocols


@pytest.fixture(scope="session")
def protocols() -> Protocols:
    files = protocol.protocol_files(protocol.data_dirs({}), ("stable/xdg-shell/xdg-shell.xml",))
    return protocol.load(files)
