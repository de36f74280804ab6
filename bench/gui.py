"""Time to first frame of a Wayland client and of a GTK4 window, on sway's raw socket and
through a compartment's Wayland filter, side by side in one run; and the filter's memory.

A client (tests/wayland/client.py, on qnix's own codec) connects, binds wl_compositor, wl_shm
and xdg_wm_base, maps a 256x256 toplevel with an shm buffer and waits for the frame callback
of its first commit: connect to first frame. The GTK4 window (tests/wayland/gtk_window.py,
python3-gi with GSK_RENDERER=cairo) is timed from starting its process to its first frame
painted and a round trip after it (so the compositor has its commit): the interpreter and
GTK's start are in both paths alike. Each path is timed alternating, after one warm-up each;
the medians and their ratio are printed against the target (through the filter at most 1.5
times the raw socket), with the filter's resident memory (one per compartment) idle and
after the runs. sway 1.7 runs headless (pixman, no GPU) as a test user made for the run
(tests/wayland/desktop.py), removed at the end. Run it as root: `python bench/gui.py`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' desktop and client

from qnix.runtime.waylandproxy import load_protocols  # noqa: E402
from qnix.wayland.protocol import Protocols  # noqa: E402
from qnix.wayland.wire import Fd  # noqa: E402
from tests.wayland.client import Client  # noqa: E402
from tests.wayland.desktop import TIMEOUT, Desktop  # noqa: E402

RUNS = 15
GTK_RUNS = 9
SIDE = 256
# Through the filter, at most this times the raw socket (issue 10).
TARGET = 1.5
XRGB8888 = 1


def first_frame(display: Path, protocols: Protocols) -> float:
    """Seconds from connecting to the compositor's answer to the first frame."""
    started = time.perf_counter()
    client = Client(display, protocols)
    try:
        shown = client.globals()
        shm = client.bind(shown["wl_shm"][0], "wl_shm")
        compositor = client.bind(shown["wl_compositor"][0], "wl_compositor", 4)
        wm_base = client.bind(shown["xdg_wm_base"][0], "xdg_wm_base")
        surface = client.new("wl_surface", 4)
        client.send(compositor, "wl_compositor", "create_surface", surface)
        xdg_surface = client.new("xdg_surface")
        client.send(wm_base, "xdg_wm_base", "get_xdg_surface", xdg_surface, surface)
        toplevel = client.new("xdg_toplevel")
        client.send(xdg_surface, "xdg_surface", "get_toplevel", toplevel)
        client.send(toplevel, "xdg_toplevel", "set_app_id", "bench")
        client.send(surface, "wl_surface", "commit")
        serial = None
        while serial is None:
            for event in client.events():
                if event.message.name == "ping":
                    client.send(wm_base, "xdg_wm_base", "pong", event.args[0])
                if event.object_id == xdg_surface and event.message.name == "configure":
                    serial = event.args[0]
        client.send(xdg_surface, "xdg_surface", "ack_configure", serial)
        size = SIDE * SIDE * 4
        memfd = os.memfd_create("frame")
        os.ftruncate(memfd, size)
        pool, buffer = client.new("wl_shm_pool"), client.new("wl_buffer")
        client.send(shm, "wl_shm", "create_pool", pool, Fd(memfd), size)
        os.close(memfd)
        client.send(pool, "wl_shm_pool", "create_buffer", buffer, 0, SIDE, SIDE, SIDE * 4, XRGB8888)
        client.send(surface, "wl_surface", "attach", buffer, 0, 0)
        client.send(surface, "wl_surface", "damage", 0, 0, SIDE, SIDE)
        callback = client.new("wl_callback")
        client.send(surface, "wl_surface", "frame", callback)
        client.send(surface, "wl_surface", "commit")
        while True:
            for event in client.events():
                if event.message.name == "ping":
                    client.send(wm_base, "xdg_wm_base", "pong", event.args[0])
                if event.object_id == callback:
                    return time.perf_counter() - started
    finally:
        client.close()


def gtk_first_frame(desktop: Desktop, runtime_dir: Path) -> float:
    """Seconds from starting a GTK4 window's process to its first frame."""
    started = time.perf_counter()
    window = desktop.gtk_window(runtime_dir, "bench.gtk", "bench", stay=False)
    assert window.stdout is not None
    line = window.stdout.readline()
    took = time.perf_counter() - started
    _, error = window.communicate(timeout=TIMEOUT)
    desktop.processes.remove(window)
    if line != b"frame\n":
        raise RuntimeError(f"the GTK4 window did not draw: {error!r}")
    return took


def verdict(ratio: float) -> str:
    return "met" if ratio <= TARGET else f"missed by a factor of {ratio / TARGET:.2f}"


def report(title: str, timings: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    print(title)
    for name, median in medians.items():
        print(f"  {name:12s} {median:7.2f} ms")
    ratio = medians["filter"] / medians["raw socket"]
    print(f"  filter / raw {ratio:7.2f}  (target <= {TARGET}: {verdict(ratio)})")


def main() -> int:
    if os.geteuid() != 0:
        print("run this as root: it makes a test user for sway", file=sys.stderr)
        return 1
    protocols = load_protocols(dict(os.environ))
    desktop = Desktop(Path(tempfile.mkdtemp(prefix="qnix-gui-bench-")))
    try:
        folder = desktop.filter("bench")
        idle_kib = desktop.rss_kib("bench")
        paths = {"raw socket": desktop.display, "filter": folder / "wayland-0"}
        timings: dict[str, list[float]] = {name: [] for name in paths}
        for display in paths.values():
            first_frame(display, protocols)  # warm-up
        for _ in range(RUNS):
            for name, display in paths.items():
                timings[name].append(first_frame(display, protocols))
        runtime_dirs = {"raw socket": desktop.run, "filter": folder}
        gtk: dict[str, list[float]] = {name: [] for name in runtime_dirs}
        for runtime_dir in runtime_dirs.values():
            gtk_first_frame(desktop, runtime_dir)  # warm-up
        for _ in range(GTK_RUNS):
            for name, runtime_dir in runtime_dirs.items():
                gtk[name].append(gtk_first_frame(desktop, runtime_dir))
        used_kib = desktop.rss_kib("bench")
    finally:
        desktop.close()
    headless = "sway 1.7 headless (pixman)"
    report(f"time to first frame, {SIDE}x{SIDE} shm, median of {RUNS}, {headless}", timings)
    report(f"time to first frame, GTK4 window (cairo), median of {GTK_RUNS}, {headless}", gtk)
    print("Wayland filter memory (one per GUI compartment), resident")
    print(f"  idle         {idle_kib / 1024:7.1f} MiB")
    print(f"  after runs   {used_kib / 1024:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
