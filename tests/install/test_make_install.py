"""The issue's own test, for real on this host: `make install`, then `qnix --version` from a
clean environment, the installed units through `systemd-analyze verify`, then `make uninstall`
leaves every place install writes as it was (the state root aside)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qnix.runtime.install import COMMAND_LINK, IDENTITY, STATE_ROOT, UNIT_DIR, VENV
from tests.conftest import ROOT, need
from tests.install.support import listing

UNITS = (
    "qnix-audit-seal.service",
    "qnix-audit-seal.timer",
    "qnix-boot.service",
    "qnix-gc.service",
    "qnix-gc.timer",
    "qnix-host-key.service",
    "qnix-integrity.service",
    "qnix-integrity.timer",
    "qnix-received-append-only.service",
    "qnix-received-append-only.timer",
)


def make(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("make"), "-C", str(ROOT), target],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_make_install_then_make_uninstall(capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/etc/NIXOS").exists():
        # NixOS is installed with the flake (tests/compile/test_services.py); make says so.
        refused = make("install")
        assert refused.returncode != 0
        assert "on NixOS qnix is installed with the flake" in refused.stderr
        return
    assert not VENV.exists(), f"{VENV} exists: this test installs qnix there itself"
    # A state root with files in it (say, `make demo` ran first) keeps the host key install
    # makes: uninstall cannot tell whether those files are encrypted to it.
    keeps_identity = not IDENTITY.exists() and STATE_ROOT.is_dir() and any(STATE_ROOT.iterdir())
    made_config_dir = not IDENTITY.parent.exists()
    before = listing(Path("/"))
    installed = make("install")
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert f"linked {COMMAND_LINK} -> {VENV}/bin/qnix" in installed.stdout

        version = subprocess.run(
            ["env", "-i", str(COMMAND_LINK), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (version.returncode, version.stdout) == (0, "qnix, version 0.1.0\n")

        verified = subprocess.run(
            [need("systemd-analyze"), "verify", "--man=no", *(str(UNIT_DIR / u) for u in UNITS)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        with capsys.disabled():
            print(f"\nsystemd-analyze verify of the installed units: exit {verified.returncode}")
        assert verified.returncode == 0, verified.stderr
    finally:
        uninstalled = make("uninstall")
    assert uninstalled.returncode == 0, uninstalled.stdout + uninstalled.stderr
    if keeps_identity:
        assert f"kept {IDENTITY}: the state root {STATE_ROOT} holds files" in uninstalled.stdout
        IDENTITY.unlink()  # what `qnix uninstall --purge` would remove, with the state
        if made_config_dir:
            IDENTITY.parent.rmdir()
    assert listing(Path("/")) == before
    assert not VENV.exists() and not COMMAND_LINK.is_symlink()
