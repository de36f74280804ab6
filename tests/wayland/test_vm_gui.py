"""`gui = true` on a live VM compartment (QEMU under TCG): its apps run under waypipe's server in
the guest, whose connections reach the host's waypipe client over the agent port, and that
client's display is the compartment's Wayland filter. So a window from the guest carries the
compartment's name, cannot go fullscreen and finds no screencopy; the control is the same
waypipe pair on the compositor's raw socket, which passes all of it through unchanged. The
other attacks of tests/wayland/test_attacks.py (typing into a host window, the clipboard,
listing windows, the compositor's IPC socket) are made from the guest of one GUI VM, each with
its control on the raw socket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from qnix.runtime import quickrun, vmlink
from qnix.runtime.backends import vm
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost
from tests.wayland.desktop import CLIPBOARD_ATTEMPTS, Desktop, pause_before_retry, wait_for
from tests.wayland.test_attacks import RACE, copy, paste
from tests.wayland.test_gui_compartment import filters

SPEC = """\
[host]
hostname = "lab"
subnet = "10.204.0.0/16"

[compartments.guivm]
isolation = "vm"
gui = true
memory_mb = 1024  # waypipe mirrors foot's 512 MiB shm pool whole in the guest
"""
SLOW = 180.0  # a TCG guest starting foot under waypipe


@pytest.fixture(scope="module")
def host(desktop: Desktop) -> Iterator[LiveHost]:
    os.environ[vm.ACCEL_ENV] = "tcg"  # the keepers inherit it from `qnix apply`
    live = LiveHost()
    try:
        live.ok("apply", str(live.spec(SPEC)))
        yield live
    finally:
        live.qnix("down")
        live.close()
        del os.environ[vm.ACCEL_ENV]


def qnix(host: LiveHost, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in host.env.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")}
    return subprocess.run(
        [QNIX, *args], env={**environ, **env}, capture_output=True, text=True, timeout=SLOW
    )


def waypipes(host: LiveHost) -> dict[int, int]:
    """The host's waypipe clients serving this host's compartments: pid -> uid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            uid = entry.stat().st_uid
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue
        if argv[0].endswith(b"waypipe") and any(
            str(host.paths.run_root).encode() in arg for arg in argv
        ):
            found[int(entry.name)] = uid
    return found


def window(desktop: Desktop, app_id: str) -> dict[str, object]:
    found: list[dict[str, object]] = []

    def mapped() -> bool:
        found[:] = [w for w in desktop.tree() if w.get("app_id") == app_id]
        return bool(found)

    wait_for(mapped, f"a window {app_id}", timeout=SLOW)
    return found[0]


class Pair(NamedTuple):
    """The controls' waypipe pair on the compositor's raw socket."""

    server: list[str]  # runs an app (appended) under a waypipe server connected to the client
    client_pid: int


@pytest.fixture(scope="module")
def raw_waypipe(desktop: Desktop) -> Pair:
    """A waypipe client on the compositor's raw socket, with the options qnix gives the
    guest's, run as the desktop's user, as are the servers of the controls."""
    socket_path = str(desktop.home / "waypipe-control")
    options = [*vmlink.WAYPIPE_OPTIONS, "--socket", socket_path]
    client = desktop.spawn([need("waypipe"), *options, "client"], desktop.run)
    wait_for(lambda: Path(socket_path).is_socket(), "the waypipe client")
    return Pair([need("waypipe"), *options, "server", "--"], client.pid)


def test_waypipe_alone_passes_everything_through(desktop: Desktop, raw_waypipe: Pair) -> None:
    """The control: waypipe between an app and the compositor's raw socket changes nothing —
    the app id it claims, fullscreen and screencopy all get through."""
    app = desktop.spawn(
        [
            *(*raw_waypipe.server, need("foot")),
            *("--app-id", "qnix-banking.x", "--fullscreen", "-e", "sleep", "600"),
        ],
        desktop.run,
    )
    try:
        assert window(desktop, "qnix-banking.x")["fullscreen_mode"] == 1
        shot = desktop.run_as_user(
            [*raw_waypipe.server, need("grim"), "-t", "ppm", "-"], desktop.run
        )
        assert shot.returncode == 0, shot.stderr
        assert shot.stdout.startswith(b"P6")
    finally:
        # waypipe's server leaves its app running when it is told to end: the control's
        # processes go by pid, the desktop user's waypipes (but the pair's client, which the
        # next controls use), foot and its sleep.
        app.terminate()
        app.wait(30)
        for pid in set(desktop.user_pids()) - {raw_waypipe.client_pid}:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if Path(f"/proc/{pid}/comm").read_text().strip() in ("waypipe", "foot", "sleep"):
                    os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: not [w for w in desktop.tree() if w.get("app_id") == "qnix-banking.x"],
            "the control's window to go",
        )


def test_a_gui_vm_shows_its_windows_through_its_filter(desktop: Desktop, host: LiveHost) -> None:
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    started = qnix(host, "start", "guivm", **display)
    assert started.returncode == 0, started.stderr
    assert len(filters(host)) == 1
    # The host's waypipe client runs as the compartment's host uid, not root's nor the
    # desktop user's.
    state = quickrun.running_state(host.paths, "guivm")
    assert state is not None
    assert list(waypipes(host).values()) == [state["host_uid"]]
    # Its commands get no display of their own: only a GUI app has one, waypipe's.
    plain = qnix(host, "run", "guivm", "--", "sh", "-c", "echo ${WAYLAND_DISPLAY:-none}")
    assert (plain.returncode, plain.stdout) == (0, "none\n"), plain.stderr

    app = subprocess.Popen(
        [
            *(QNIX, "run", "--gui", "guivm", "--", "foot"),
            *("--app-id", "qnix-banking.x", "--fullscreen", "-e", "sleep", "600"),
        ],
        env={**host.env, **display},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The filter's rewrite: it passed the filter, whatever it claimed; not fullscreen.
        found = window(desktop, "qnix-guivm.qnix-banking.x")
        assert found["fullscreen_mode"] == 0
        assert not [w for w in desktop.tree() if w.get("app_id") == "qnix-banking.x"]
        # Nothing to capture the screen with from inside the guest.
        grim = subprocess.run(
            [QNIX, "run", "--gui", "guivm", "--", "grim", "/tmp/x.png"],
            env={**host.env, **display},
            capture_output=True,
            text=True,
            timeout=SLOW,
            check=False,
        )
        assert grim.returncode != 0
        assert "doesn't support wlr-screencopy" in grim.stderr
    finally:
        app.terminate()
        app.wait(30)
    # A killed `qnix run` ends its app in the guest, and its window goes.
    wait_for(
        lambda: not [w for w in desktop.tree() if str(w.get("app_id")).startswith("qnix-guivm.")],
        "the window to go",
        timeout=SLOW,
    )

    stopped = qnix(host, "stop", "guivm")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not filters(host) and not waypipes(host), "the filter and waypipe to end")


def test_a_vm_started_without_a_display_refuses_gui_apps(desktop: Desktop, host: LiveHost) -> None:
    started = qnix(host, "start", "guivm")
    assert started.returncode == 0, started.stderr
    try:
        assert not waypipes(host)
        refused = qnix(
            host, "run", "--gui", "guivm", "--", "true", QNIX_WAYLAND_DISPLAY=str(desktop.display)
        )
        assert refused.returncode == 1
        assert "runs without a display" in refused.stderr
    finally:
        assert qnix(host, "stop", "guivm").returncode == 0


def test_a_killed_keeper_takes_the_filter_and_waypipe_along(
    desktop: Desktop, host: LiveHost
) -> None:
    started = qnix(host, "start", "guivm", QNIX_WAYLAND_DISPLAY=str(desktop.display))
    assert started.returncode == 0, started.stderr
    assert len(filters(host)) == 1 and len(waypipes(host)) == 1
    state = quickrun.running_state(host.paths, "guivm")
    assert state is not None
    os.kill(state["keeper_pid"], signal.SIGKILL)
    # The filter reads its end from the keeper's pipe; the relay, told by its parent-death
    # signal, ends QEMU and the waypipe client.
    wait_for(lambda: not filters(host) and not waypipes(host), "the filter and waypipe to end")
    assert qnix(host, "gc").returncode == 0


# ---- the attacks of tests/wayland/test_attacks.py, made from the guest --------------------
# One GUI VM for all of them. Each control is the same attack on the compositor's raw socket,
# through the raw waypipe pair when the attack is a Wayland client's.

VICTIM_TITLE = "victim-secret-title"
LISTER = Path(__file__).with_name("list_windows.py")
PYTHON = "/usr/bin/python3"  # the guest's /usr is the host's; qnix's modules are not there


@pytest.fixture(scope="module")
def gui_vm(desktop: Desktop, host: LiveHost) -> Iterator[dict[str, str]]:
    """guivm, started with the desktop as its display; the environment of `qnix run --gui`."""
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    started = qnix(host, "start", "guivm", **display)
    assert started.returncode == 0, started.stderr
    try:
        yield {
            **{k: v for k, v in host.env.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")},
            **display,
        }
    finally:
        qnix(host, "stop", "guivm")


@pytest.fixture(scope="module")
def victim(desktop: Desktop) -> Path:
    """A host window on the raw socket, titled VICTIM_TITLE, running `cat > file`: the file."""
    typed = desktop.home / "typed.txt"
    desktop.spawn(
        [
            *(need("foot"), "--app-id", "victim", "--title", VICTIM_TITLE),
            *("-e", "sh", "-c", f"cat > {typed}"),
        ],
        desktop.run,
    )
    desktop.window("victim")
    return typed


def in_guest(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """ARGV run in the guest with `qnix run --gui`, under waypipe's server."""
    return subprocess.run(
        [QNIX, "run", "--gui", "guivm", "--", *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SLOW,
        check=False,
    )


def test_typing_into_a_host_window_from_the_guest(
    desktop: Desktop, gui_vm: dict[str, str], victim: Path
) -> None:
    # The control is the raw socket without waypipe: waypipe 0.8.4 does not carry wtype's
    # keyboard. Its server makes a shadow of the keymap's file descriptor (virtual-keyboard's
    # keymap request) but does not send the file, so its client cannot translate the request
    # ("Could not untranslate remote id 1") and ends the connection ("waypipe internal
    # error"), and wtype, which does not check, exits 0 having typed nothing.
    wtype = need("wtype")
    control = desktop.run_as_user([wtype, "control\n"], desktop.run)
    assert control.returncode == 0, control.stderr
    wait_for(lambda: victim.exists() and victim.read_text() == "control\n", "the typed line")
    desktop.keyboard = desktop.new_keyboard()  # wtype's keyboard took the seat's keymap along

    attack = in_guest(gui_vm, "wtype", "injected\n")
    assert attack.returncode != 0
    assert "virtual keyboard" in attack.stderr, attack.stderr
    desktop.run_as_user([wtype, "after\n"], desktop.run)  # the window still reads keys
    wait_for(lambda: victim.read_text() == "control\nafter\n", "the line typed after")
    desktop.keyboard = desktop.new_keyboard()


def paste_in_guest(env: dict[str, str]) -> str:
    """What wl-paste in the guest gets; an empty selection is "" (wl-paste's own answer). It
    has no data-control there, so it maps a window for the focus: see RACE."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        result = in_guest(env, "wl-paste", "--no-newline")
        if result.returncode == 0:
            return result.stdout
        if RACE.decode() not in result.stderr:
            assert result.stderr == "No selection\n", result.stderr
            return ""
        pause_before_retry(attempt)
    raise AssertionError(f"wl-paste in the guest failed {CLIPBOARD_ATTEMPTS} times")


def copy_in_guest(desktop: Desktop, env: dict[str, str], text: str) -> subprocess.Popen[str]:
    """wl-copy in the guest, serving `text` (the host's raw socket reads it) until its
    `qnix run` is ended."""
    for attempt in range(CLIPBOARD_ATTEMPTS):
        process = subprocess.Popen(
            [QNIX, "run", "--gui", "guivm", "--", "wl-copy", "--foreground", text],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

        def served(process: subprocess.Popen[str] = process) -> bool:
            return process.poll() is not None or paste(desktop, desktop.run) == text.encode()

        wait_for(served, "the guest's selection", timeout=SLOW)
        if process.poll() is None:
            return process
        _, error = process.communicate()
        assert RACE.decode() in error, error
        pause_before_retry(attempt)
    raise AssertionError(f"wl-copy in the guest failed {CLIPBOARD_ATTEMPTS} times")


def test_the_clipboard_from_the_host_and_within_the_guest(
    desktop: Desktop, gui_vm: dict[str, str], raw_waypipe: Pair
) -> None:
    copy(desktop, desktop.run, "from-the-host")
    wait_for(lambda: paste(desktop, desktop.run) == b"from-the-host", "the host's selection")
    control = desktop.run_as_user(
        [*raw_waypipe.server, need("wl-paste"), "--no-newline"], desktop.run
    )
    assert (control.returncode, control.stdout) == (0, b"from-the-host"), control.stderr
    assert paste_in_guest(gui_vm) == ""  # host -> VM: refused

    copier = copy_in_guest(desktop, gui_vm, "from-the-guest")
    try:
        assert paste_in_guest(gui_vm) == "from-the-guest"  # VM -> itself
    finally:
        copier.terminate()
        copier.wait(30)


def test_listing_windows_from_the_guest(
    host: LiveHost, desktop: Desktop, gui_vm: dict[str, str], raw_waypipe: Pair, victim: Path
) -> None:
    lister = [PYTHON, "-I", "-c", LISTER.read_text()]
    control = desktop.run_as_user([*raw_waypipe.server, *lister], desktop.run)
    assert control.returncode == 0, control.stderr
    listed = control.stdout.decode().splitlines()
    assert listed[0].startswith("shown ") and listed[-1] == "done", listed
    assert f"title {VICTIM_TITLE}" in listed
    name = listed[0].split()[1]

    # Not shown, and a bind by the raw socket's name ends the connection: the filter ends
    # waypipe's client's, and waypipe's server in the guest tells the app with an error.
    attack = in_guest(gui_vm, *lister, name)
    assert attack.stdout.splitlines() == ["not shown", "error waypipe internal error"], (
        attack.stdout,
        attack.stderr,
    )
    assert attack.returncode == 4
    refusal = f"client ended: a bind to global {name}, which this client was not shown\n"
    assert refusal in host.paths.keeper_log("guivm").read_text()


def test_the_compositors_ipc_socket_is_out_of_the_guests_reach(
    desktop: Desktop, gui_vm: dict[str, str]
) -> None:
    control = desktop.run_as_user(
        [need("swaymsg"), "-s", str(desktop.ipc), "-t", "get_version"], desktop.run
    )
    assert control.returncode == 0, control.stderr
    assert b"human_readable" in control.stdout

    # In the guest: the runtime folder holds waypipe's displays only, the socket's path is
    # not there, and swaymsg (the host's, from /usr) cannot connect to it.
    attack = in_guest(
        gui_vm,
        "sh",
        "-c",
        'ls -A "$XDG_RUNTIME_DIR"; test -e "$1" || echo absent; '
        'SWAYSOCK="$1" swaymsg -t get_version',
        "sh",
        str(desktop.ipc),
    )
    *runtime, absent = attack.stdout.splitlines()
    assert runtime and all(entry.startswith("wayland-") for entry in runtime), runtime
    assert absent == "absent"
    assert attack.returncode != 0
    assert f"Unable to connect to {desktop.ipc}" in attack.stderr, attack.stderr
