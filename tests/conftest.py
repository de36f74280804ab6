"""Shared fixtures. A skipped test fails the run: a skipped isolation check proves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = Path(__file__).resolve().parent / "data"


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
