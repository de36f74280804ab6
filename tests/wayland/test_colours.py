"""The label colours on a real desktop: sway 1.7 with the generated fragment shows a window of
work and one of banking, opened through their Wayland filters, each with a title badge in its
label's colour; the same windows without the fragment show neither colour."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.compile.desktop import LABEL_COLOURS, sway_fragment
from tests.compile.nix.support import workstation
from tests.conftest import need
from tests.wayland.desktop import Desktop

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
