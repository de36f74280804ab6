"""`qnix clip` between GUI compartments: banking's Wayland selection, taken through banking's
filter, becomes personal's for exactly one paste, as the policy decides. The control: without
`qnix clip`, personal cannot read banking's selection."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost
from tests.wayland.desktop import CLIPBOARD_ATTEMPTS, Desktop, pause_before_retry, wait_for

SPEC = """\
[host]
hostname = "lab"
subnet = "10.216.0.0/16"

[compartments.banking]
label = "green"
gui = true
memory_mb = 256

[compartments.personal]
label = "yellow"
gui = true
memory_mb = 256

[compartments.work]
label = "blue"
gui = true
memory_mb = 256

[policy]
rules = ["qnix.Clipboard * banking personal allow", "qnix.Clipboard * banking work deny"]
"""
# See tests/wayland/test_attacks.py: wl-copy and wl-paste without data-control race sway's
# first configure; they are tried again.
RACE = "has never been configured"


@pytest.fixture(scope="module")
def host(desktop: Desktop) -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        live.ok("apply", str(live.spec(SPEC)))
        for name in ("banking", "personal", "work"):
            started = qnix(live, desktop, "start", name)
            assert started.returncode == 0, started.stderr
        yield live
    finally:
        live.qnix("down")
        live.close()


def qnix(host: LiveHost, desktop: Desktop, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in host.env.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")}
    return subprocess.run(
        [QNIX, *args],
        env={**environ, "QNIX_WAYLAND_DISPLAY": str(desktop.display)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def paste(host: LiveHost, desktop: Desktop, name: str) -> str:
    """What wl-paste inside `name` gets; "" for an empty selection."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        result = qnix(host, desktop, "run", name, "--", need("wl-paste"), "--no-newline")
        if result.returncode == 0:
            return result.stdout
        if RACE not in result.stderr:
            assert result.stderr == "No selection\n", result.stderr
            return ""
        pause_before_retry(attempt)
    raise AssertionError(f"wl-paste failed {CLIPBOARD_ATTEMPTS} times")


def copy(host: LiveHost, desktop: Desktop, name: str, text: str) -> subprocess.Popen[str]:
    """wl-copy inside `name`, which stays to serve its selection."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        process = subprocess.Popen(
            [QNIX, "run", name, "--", need("wl-copy"), "--foreground", text],
            env={k: v for k, v in host.env.items() if k != "WAYLAND_DISPLAY"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            return process
        _, error = process.communicate()
        assert RACE in error, error
        pause_before_retry(attempt)
    raise AssertionError(f"wl-copy failed {CLIPBOARD_ATTEMPTS} times")


def clip_records(host: LiveHost) -> list[dict[str, Any]]:
    lines = host.paths.audit_log.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "clipboard"]


def test_qnix_clip_carries_banking_s_selection_to_personal_once(
    desktop: Desktop, host: LiveHost
) -> None:
    copier = copy(host, desktop, "banking", "iban DE00 1234")
    try:
        wait_for(lambda: paste(host, desktop, "banking") == "iban DE00 1234", "the selection")
        # The control: without qnix clip, personal sees no selection.
        assert paste(host, desktop, "personal") == ""

        copied = qnix(host, desktop, "clip", "copy", "banking")
        assert copied.returncode == 0, copied.stderr
        assert copied.stdout == "copied 14 bytes (text) from banking\n"
        shown = qnix(host, desktop, "clip", "show")
        assert shown.stdout.startswith("14 bytes (text) from banking")
        pasted = qnix(host, desktop, "clip", "paste", "personal")
        assert pasted.returncode == 0, pasted.stderr
        assert pasted.stdout == "pasted 14 bytes (text) from banking into personal\n"

        assert paste(host, desktop, "personal") == "iban DE00 1234"  # once
        assert paste(host, desktop, "personal") == ""  # and gone
        assert paste(host, desktop, "banking") == "iban DE00 1234"  # banking's own stays
        copy_record, paste_record = clip_records(host)[-2:]
        assert (copy_record["action"], copy_record["source"], copy_record["via"]) == (
            "copy",
            "banking",
            "wayland",
        )
        assert (
            paste_record["action"],
            paste_record["target"],
            paste_record["via"],
            paste_record["result"],
        ) == ("paste", "personal", "wayland", "ok")
    finally:
        copier.terminate()
        copier.wait(30)


def test_qnix_clip_paste_is_refused_where_the_policy_denies(
    desktop: Desktop, host: LiveHost
) -> None:
    copier = copy(host, desktop, "banking", "secret for work")
    try:
        wait_for(lambda: paste(host, desktop, "banking") == "secret for work", "the selection")
        copied = qnix(host, desktop, "clip", "copy", "banking")
        assert copied.returncode == 0, copied.stderr
        denied = qnix(host, desktop, "clip", "paste", "work")
        assert denied.returncode == 1
        assert "denied" in denied.stderr
        assert paste(host, desktop, "work") == ""
        record = clip_records(host)[-1]
        assert (record["action"], record["target"], record["result"]) == (
            "paste",
            "work",
            "denied",
        )
        # The control: the same clipboard, where the policy allows, arrives.
        allowed = qnix(host, desktop, "clip", "paste", "personal")
        assert allowed.returncode == 0, allowed.stderr
        assert paste(host, desktop, "personal") == "secret for work"
    finally:
        copier.terminate()
        copier.wait(30)


def test_qnix_clip_copy_of_a_compartment_without_a_selection(
    desktop: Desktop, host: LiveHost
) -> None:
    cleared = qnix(host, desktop, "clip", "clear")
    assert cleared.returncode == 0, cleared.stderr
    empty = qnix(host, desktop, "clip", "copy", "work")
    assert empty.returncode == 1
    assert "the Wayland filter of work refused: the compartment has no selection" in empty.stderr
