"""The attacks of a compartment that holds a Wayland socket, against sway 1.7 headless.

Each attack runs twice: on the compositor's raw socket (the control: it must work, or the test
proves nothing) and through the compartment's filter (it must fail)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.wayland.protocol import Protocols
from qnix.wayland.wire import WireError
from tests.conftest import need
from tests.wayland.client import Client, Disconnected, capture, count_colour
from tests.wayland.desktop import CLIPBOARD_ATTEMPTS, Desktop, pause_before_retry, wait_for

VICTIM_RGB = (0x12, 0xAB, 0x34)
FILTER_ARGV = [sys.executable, "-m", "qnix.runtime.waylandproxy"]


@pytest.fixture(scope="module")
def victim(desktop: Desktop) -> dict[str, object]:
    """A host window painted one unique colour, with a unique title."""
    desktop.spawn(
        [
            need("foot"),
            "--app-id",
            "victim",
            "--title",
            "victim-secret-title",
            "-o",
            "colors.background=12ab34",
            "-e",
            "sleep",
            "3600",
        ],
        desktop.run,
    )
    return desktop.window("victim")


@contextlib.contextmanager
def connected(display: Path, protocols: Protocols) -> Iterator[Client]:
    client = Client(display, protocols)
    try:
        yield client
    finally:
        client.close()


def raw_names(desktop: Desktop, protocols: Protocols) -> dict[str, int]:
    """The global names sway gives (the same on every start: an attacker knows them)."""
    with connected(desktop.display, protocols) as client:
        return {interface: name for interface, (name, _) in client.globals().items()}


def test_capture_with_grim(desktop: Desktop, victim: dict[str, object]) -> None:
    grim = need("grim")
    control = desktop.run_as_user([grim, "-t", "ppm", "-"], desktop.run)
    assert control.returncode == 0, control.stderr
    header_end = control.stdout.index(b"255\n") + 4
    assert count_colour(control.stdout[header_end:], VICTIM_RGB, bgrx=False) > 10000

    filtered = desktop.run_as_user([grim, "-t", "ppm", "-"], desktop.filter("grab"))
    assert filtered.returncode != 0
    assert filtered.stdout == b""
    assert b"doesn't support wlr-screencopy" in filtered.stderr


def test_capture_by_a_guessed_global_name(
    desktop: Desktop, victim: dict[str, object], protocols: Protocols
) -> None:
    names = raw_names(desktop, protocols)
    with connected(desktop.display, protocols) as client:
        assert count_colour(capture(client, names), VICTIM_RGB) > 10000

    screencopy = names["zwlr_screencopy_manager_v1"]
    filtered = desktop.filter("guess") / "wayland-0"
    # Before the registry is even read, and after: either way the bind ends the client.
    with connected(filtered, protocols) as client, pytest.raises(Disconnected):
        client.bind(screencopy, "zwlr_screencopy_manager_v1")
        client.roundtrip()
    with connected(filtered, protocols) as client, pytest.raises(Disconnected):
        assert "zwlr_screencopy_manager_v1" not in client.globals()
        capture(client, names)
    refusal = f"client ended: a bind to global {screencopy}, which this client was not shown\n"
    wait_for(lambda: desktop.filter_log("guess") == refusal * 2, "the filter's two refusals")


def test_typing_into_another_window(desktop: Desktop) -> None:
    typed = desktop.home / "typed.txt"
    desktop.spawn(
        [need("foot"), "--app-id", "typist", "-e", "sh", "-c", f"cat > {typed}"], desktop.run
    )
    desktop.window("typist")
    wtype = need("wtype")
    control = desktop.run_as_user([wtype, "control\n"], desktop.run)
    assert control.returncode == 0, control.stderr
    wait_for(lambda: typed.exists() and typed.read_text() == "control\n", "the typed line")

    filtered = desktop.run_as_user([wtype, "injected\n"], desktop.filter("typing"))
    assert filtered.returncode != 0
    assert b"virtual keyboard" in filtered.stderr
    desktop.run_as_user([wtype, "after\n"], desktop.run)  # proves the window still reads keys
    wait_for(lambda: typed.read_text() == "control\nafter\n", "the line typed after")
    desktop.keyboard = desktop.new_keyboard()  # wtype's keyboard took the seat's keymap along


def test_claiming_another_compartments_app_id_and_fullscreen(desktop: Desktop) -> None:
    argv = [need("foot"), "--app-id", "qnix-banking.x", "--fullscreen", "-e", "sleep", "3600"]
    control = desktop.spawn(argv, desktop.run)
    window = desktop.window("qnix-banking.x")
    assert (window["app_id"], window["fullscreen_mode"]) == ("qnix-banking.x", 1)
    desktop.close_window(control, "qnix-banking.x")

    desktop.spawn(argv, desktop.filter("personal"))
    window = desktop.window("qnix-personal.")
    assert (window["app_id"], window["fullscreen_mode"]) == ("qnix-personal.qnix-banking.x", 0)
    assert str(window["name"]).startswith("[personal] ")
    assert not [w for w in desktop.tree() if str(w.get("app_id")).startswith("qnix-banking")]


def test_fullscreen_where_the_spec_allows_it(desktop: Desktop) -> None:
    argv = [need("foot"), "--app-id", "film", "--fullscreen", "-e", "sleep", "3600"]
    process = desktop.spawn(argv, desktop.filter("cinema", fullscreen=True))
    window = desktop.window("qnix-cinema.film")
    assert window["fullscreen_mode"] == 1
    # A fullscreen window keeps the focus from the windows the next tests open.
    desktop.close_window(process, "qnix-cinema.film")


def test_listing_other_windows(
    desktop: Desktop, victim: dict[str, object], protocols: Protocols
) -> None:
    names = raw_names(desktop, protocols)
    manager = "zwlr_foreign_toplevel_manager_v1"
    with connected(desktop.display, protocols) as client:
        client.bind(names[manager], manager)
        titles = [e.args[0] for e in client.roundtrip() if e.message.name == "title"]
        assert "victim-secret-title" in titles

    with connected(desktop.filter("lister") / "wayland-0", protocols) as client:
        shown = client.globals()
        assert manager not in shown
        assert "wl_compositor" in shown
        client.bind(names[manager], manager)
        with pytest.raises(Disconnected):
            client.roundtrip()
    refusal = f"client ended: a bind to global {names[manager]}, which this client was not shown\n"
    wait_for(lambda: desktop.filter_log("lister") == refusal, "the filter's refusal")


# Without data-control, wl-copy and wl-paste map a window to get focus and attach a buffer
# after one round trip, whether or not sway has configured the window yet; when sway is slow
# (other windows being laid out) it ends them with "xdg_surface has never been configured".
# That is wl-clipboard's race, not the filter's: they are tried again.
RACE = b"has never been configured"


def paste(desktop: Desktop, runtime_dir: Path, *options: str) -> bytes:
    """What wl-paste gets; an empty selection is b"" (checked to be wl-paste's own answer)."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        result = desktop.run_as_user([need("wl-paste"), "--no-newline", *options], runtime_dir)
        if result.returncode == 0:
            return result.stdout
        if RACE not in result.stderr:
            assert result.stderr == b"No selection\n", result.stderr
            return b""
        pause_before_retry(attempt)
    raise AssertionError(f"wl-paste failed {CLIPBOARD_ATTEMPTS} times")


def copy(desktop: Desktop, runtime_dir: Path, text: str, *options: str) -> None:
    """wl-copy, which stays to serve the selection (see RACE)."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        process = desktop.spawn([need("wl-copy"), "--foreground", *options, text], runtime_dir)
        try:
            process.wait(1)
        except subprocess.TimeoutExpired:
            return  # serving
        _, error = process.communicate()
        assert RACE in error, error
        pause_before_retry(attempt)
    raise AssertionError(f"wl-copy failed {CLIPBOARD_ATTEMPTS} times")


def test_clipboard_stays_in_its_compartment(desktop: Desktop) -> None:
    banking, personal = desktop.filter("banking"), desktop.filter("clip-personal")
    copy(desktop, desktop.run, "from-the-host")
    wait_for(lambda: paste(desktop, desktop.run) == b"from-the-host", "the host's selection")
    assert paste(desktop, personal) == b""  # host -> compartment: refused

    copy(desktop, banking, "from-banking")
    wait_for(lambda: paste(desktop, desktop.run) == b"from-banking", "banking's selection")
    assert paste(desktop, banking) == b"from-banking"  # banking -> banking
    assert paste(desktop, personal) == b""  # banking -> personal: refused


def test_primary_selection_stays_in_its_compartment(desktop: Desktop) -> None:
    banking, personal = desktop.filter("primary-banking"), desktop.filter("primary-personal")
    copy(desktop, banking, "selected-in-banking", "--primary")
    wait_for(
        lambda: paste(desktop, desktop.run, "--primary") == b"selected-in-banking", "the selection"
    )
    assert paste(desktop, banking, "--primary") == b"selected-in-banking"
    assert paste(desktop, personal, "--primary") == b""


def test_a_client_that_holds_the_focus_outlives_hidden_selections(desktop: Desktop) -> None:
    """A long-lived client (foot) in personal is sent a selection from banking (hidden) and
    right after its own primary selection, both new objects of the compositor's: the hidden
    offer must not leave a gap in the ids the client sees, which libwayland takes as a
    protocol error and dies of."""
    personal, banking = desktop.filter("ids-personal"), desktop.filter("ids-banking")
    argv = [need("foot"), "--app-id", "holder", "-e", "sleep", "3600"]
    holder = desktop.spawn(argv, personal)
    desktop.window("qnix-ids-personal.holder")
    copy(desktop, personal, "personal-primary", "--primary")
    copy(desktop, banking, "banking-regular")
    wait_for(lambda: paste(desktop, desktop.run) == b"banking-regular", "banking's selection")
    # Focus back on the holder: banking's selection (hidden), then personal's primary.
    copy(desktop, personal, "personal-primary-2", "--primary")
    copy(desktop, banking, "banking-regular-2")
    wait_for(lambda: paste(desktop, desktop.run) == b"banking-regular-2", "banking's selection")
    assert paste(desktop, personal, "--primary") == b"personal-primary-2"
    assert holder.poll() is None, holder.communicate()
    desktop.close_window(holder, "qnix-ids-personal.holder")


@pytest.fixture(scope="module")
def fuzzed(desktop: Desktop, protocols: Protocols) -> Iterator[tuple[Path, Client]]:
    """A filter, and a well-behaved client of it that must outlive every malformed one."""
    folder = desktop.filter("fuzzed")
    with connected(folder / "wayland-0", protocols) as bystander:
        assert "wl_compositor" in bystander.globals()
        yield folder, bystander


def _header(object_id: int, size: int, opcode: int) -> bytes:
    return object_id.to_bytes(4, "little") + ((size << 16 | opcode) & 0xFFFFFFFF).to_bytes(
        4, "little"
    )


messages = st.builds(
    lambda object_id, opcode, body, size_error: (
        _header(object_id, 8 + len(body) + size_error, opcode) + body
    ),
    # The display, the registry, the objects bound first (see below), and ids that are none.
    st.sampled_from([1, 2, 4, 5, 6, 3, 0, 0xFF000000, 0xFFFFFFFF]),
    st.integers(0, 9),
    st.binary(max_size=64).map(lambda b: b + b"\0" * (-len(b) % 4)),
    st.sampled_from([0, 0, 0, -4, 4, 2, 0x10000]),
)


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(messages, min_size=1, max_size=6), fd_count=st.sampled_from([0, 1, 3, 40]))
def test_malformed_streams_end_only_their_client(
    desktop: Desktop,
    protocols: Protocols,
    fuzzed: tuple[Path, Client],
    stream: list[bytes],
    fd_count: int,
) -> None:
    folder, bystander = fuzzed
    pipes = [os.pipe() for _ in range(fd_count)]
    try:
        with connected(folder / "wayland-0", protocols) as attacker:
            # Objects of real interfaces first (4, 5, 6), so the stream reaches their decoding.
            shown = attacker.globals()
            for interface in ("wl_compositor", "wl_shm", "xdg_wm_base"):
                attacker.bind(shown[interface][0], interface)
            attacker.send_raw(b"".join(stream), [r for r, _ in pipes])
            with contextlib.suppress(Disconnected, WireError):
                attacker.roundtrip(timeout=2)
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
    assert [
        p for p in desktop.processes if p.args[:3] == FILTER_ARGV and p.poll() is not None
    ] == []
    assert desktop.sway.poll() is None
    assert bystander.roundtrip()  # the filter still serves its other clients
