"""Shared fixtures. A skipped test fails the run: a skipped isolation check proves nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = Path(__file__).resolve().parent / "data"

# The property tests draw the same examples on every run, so that a verdict is about the code,
# not about the draw. QNIX_EXPLORE=1 draws new ones: do that when a property or the code under
# it changes, and keep what it finds as a fixed example.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("QNIX_EXPLORE") else "repeatable")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = len(reporter.stats.get("skipped", []))
    if skipped and exitstatus == 0:
        reporter.write_line(f"FAILED: {skipped} test(s) skipped; every test must run", red=True)
        session.exitstatus = 1


def need(tool: str) -> str:
    """Path of a tool the tests require; a missing tool is a failure, never a skip."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required for this test; `make test` installs it")
    return path
