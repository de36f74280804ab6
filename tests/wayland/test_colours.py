"""The label colours on a real desktop: sway 1.7 with the generated fragment shows a window of
work and one of banking, opened through their Wayland filters, each with a title badge in its
label's colour; the same windows without the fragment show neither colour."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.compile.desktop import LABEL_COLOURS, app_id_prefix, sway_fragment
from tests.compile.nix.support import workstation
from tests.conftest import need
from tests.wayland.desktop import Desktop, wait_for

WS = workstation(
    compartments={
        "work": {"label": "blue", "gui": True},
        "banking": {"label": "green", "gui": True},
    }
)
COLOURS = {name: bytes.fromhex(LABEL_COLOURS[c.label]) for name, c in WS.compartments.items()}
# A badge of a few characters on a 10 pt title bar: hundreds of pixels of its colour.
BADGE_PIXELS = 200


# work's window claims banking's badge in its title: the title is text, never markup.
HOSTILE_TITLE = "<span background='#73d216'> banking </span>"


def open_windows(desktop: Desktop) -> dict[str, dict[str, object]]:
    """A foot window in each compartment, through that compartment's filter."""
    for name in WS.compartments:
        title = HOSTILE_TITLE if name == "work" else name
        desktop.spawn(
            [
                need("foot"),
                "--title",
                title,
                "-o",
                "colors.background=101010",
                "-e",
                "sleep",
                "3600",
            ],
            desktop.filter(name),
        )
        desktop.window(f"qnix-{name}.")
    # Where each one is once both are tiled.
    return {name: desktop.window(f"qnix-{name}.") for name in WS.compartments}


def colour_counts(desktop: Desktop, window: dict[str, object] | None) -> dict[str, int]:
    """Pixels of each label colour in the title bar of `window`, or anywhere."""
    width, height, pixels = desktop.screenshot()
    rows = range(height)
    columns = range(width)
    if window is not None:
        # sway's `rect` is the window below its title bar, `deco_rect` the title bar.
        rect, title = window["rect"], window["deco_rect"]
        assert isinstance(rect, dict) and isinstance(title, dict)
        assert title["height"] > 0
        rows = range(rect["y"] - title["height"], rect["y"])
        columns = range(rect["x"], rect["x"] + rect["width"])
    counts = dict.fromkeys(COLOURS, 0)
    for row in rows:
        line = pixels[row * width * 3 : (row + 1) * width * 3]
        for column in columns:
            pixel = line[column * 3 : column * 3 + 3]
            for name, colour in COLOURS.items():
                counts[name] += pixel == colour
    return counts


@pytest.fixture()
def labelled() -> Iterator[Desktop]:
    running = Desktop(Path(tempfile.mkdtemp(prefix="qnix-colours-")), sway_fragment(WS))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture()
def unlabelled() -> Iterator[Desktop]:
    running = Desktop(Path(tempfile.mkdtemp(prefix="qnix-colours-")))
    try:
        yield running
    finally:
        running.close()


def test_each_window_wears_its_labels_colour(labelled: Desktop) -> None:
    windows = open_windows(labelled)
    assert windows["work"]["name"] == f"[work] {HOSTILE_TITLE}"
    # Side by side, as sway tiles them.
    assert windows["work"]["rect"] != windows["banking"]["rect"]
    for name, window in windows.items():
        assert window["marks"] == [f"qnix-{name}"]
        counts = colour_counts(labelled, window)
        assert counts[name] > BADGE_PIXELS, counts
        others = [other for other in COLOURS if other != name]
        assert all(counts[other] == 0 for other in others), counts


def test_control_without_the_fragment_neither_colour_shows(unlabelled: Desktop) -> None:
    windows = open_windows(unlabelled)
    assert all(window["marks"] == [] for window in windows.values())
    assert colour_counts(unlabelled, None) == {"work": 0, "banking": 0}


def press(desktop: Desktop, key: str) -> None:
    """Ctrl+Shift+`key` on a virtual keyboard, as the user would press it."""
    typed = desktop.run_as_user(
        [need("wtype"), "-M", "ctrl", "-M", "shift", key, "-m", "shift", "-m", "ctrl"],
        desktop.run,
    )
    assert typed.returncode == 0, typed.stderr
    desktop.keyboard = desktop.new_keyboard()


def test_the_clip_keys_act_only_on_the_focused_compartments_window() -> None:
    """The fragment's Ctrl+Shift+C / Ctrl+Shift+V, pressed: the command runs for the compartment
    whose window has the focus, not for the other, and not on a host window (the control).
    The commands are the generated ones with `sudo -n qnix clip ACTION` made a `touch`, since
    sway runs them as the test user."""
    root = Path(tempfile.mkdtemp(prefix="qnix-keys-"))
    ran = root / "home"
    fragment = sway_fragment(WS)
    for action in ("copy", "paste"):
        fragment = fragment.replace(
            f"exec sudo -n qnix clip {action} ", f"exec touch {ran}/{action}-"
        )
    assert fragment.count("exec touch") == 4
    desktop = Desktop(root, fragment)
    try:
        open_windows(desktop)
        desktop.spawn([need("foot"), "--app-id", "host", "-e", "sleep", "3600"], desktop.run)
        desktop.window("host")
        done: list[str] = []
        for focused, action, key in (("work", "copy", "c"), ("banking", "paste", "v")):
            focus = f'[app_id="{app_id_prefix(focused)}"] focus'
            assert (
                desktop.run_as_user(
                    [need("swaymsg"), "-s", str(desktop.ipc), focus], desktop.run
                ).returncode
                == 0
            )
            press(desktop, key)
            wait_for(lambda: (ran / f"{action}-{focused}").exists(), f"{action} {focused}")  # noqa: B023
            done.append(f"{action}-{focused}")
            time.sleep(0.5)
            assert sorted(p.name for p in ran.glob("*-*")) == sorted(done)
        # The control: on a host window the keys run nothing.
        focus_host = '[app_id="^host$"] focus'
        desktop.run_as_user([need("swaymsg"), "-s", str(desktop.ipc), focus_host], desktop.run)
        press(desktop, "c")
        press(desktop, "v")
        time.sleep(0.5)
        assert sorted(p.name for p in ran.glob("*-*")) == sorted(done)
    finally:
        desktop.close()
