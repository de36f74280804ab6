"""`gui = true` on a live namespace compartment: its Wayland filter is its only display, it
lives and dies with the compartment, and `qnix run --gui` refuses what it cannot show."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.errors import QnixError
from qnix.runtime import cgroups, waylandproxy
from qnix.runtime.backends.container import cgroup_tree
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost
from tests.wayland.desktop import Desktop, wait_for

SPEC = """\
[host]
hostname = "lab"
subnet = "10.203.0.0/16"

[compartments.personal]
gui = true
memory_mb = 256

[compartments.boxed]
isolation = "container"
gui = true
memory_mb = 256

[compartments.plain]
memory_mb = 128

[disposable_templates.gui-dvm]
gui = true
memory_mb = 256

[disposable_templates.cli-dvm]
memory_mb = 128
"""


@pytest.fixture(scope="module")
def host(desktop: Desktop) -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        live.ok("apply", str(live.spec(SPEC)))
        yield live
    finally:
        live.qnix("down")
        live.close()


def qnix(host: LiveHost, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in host.env.items() if k not in ("WAYLAND_DISPLAY", "DISPLAY")}
    return subprocess.run(
        [QNIX, *args], env={**environ, **env}, capture_output=True, text=True, timeout=60
    )


def filters(host: LiveHost) -> list[int]:
    """The pids of Wayland filters serving this host's compartments."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue
        if b"qnix.runtime.waylandproxy" in argv and any(
            str(host.paths.run_root).encode() in arg for arg in argv
        ):
            found.append(int(entry.name))
    return found


def app_scopes(host: LiveHost, name: str) -> dict[str, set[str]]:
    """Each app-* scope of compartment `name`'s cgroups: the commands of its processes."""
    top = cgroups.cgroup_of(host.paths.cgroup_name(name), cgroups.detect())
    found: dict[str, set[str]] = {}
    for folder in cgroup_tree(top).paths:
        if folder.name.startswith("app-"):
            pids = (folder / "cgroup.procs").read_text().split()
            found[folder.name] = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
    return found


def test_a_gui_compartment_sees_only_its_filter(desktop: Desktop, host: LiveHost) -> None:
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    started = qnix(host, "start", "personal", **display)
    assert started.returncode == 0, started.stderr
    assert len(filters(host)) == 1

    listing = qnix(host, "run", "personal", "--", "ls", "-A", "/run/user/1000")
    assert (listing.returncode, listing.stdout) == (0, "wayland-0\n")
    environment = qnix(host, "run", "personal", "--", "sh", "-c", "echo $WAYLAND_DISPLAY")
    assert environment.stdout == "wayland-0\n"
    # The compositor's IPC socket (swaymsg exec runs host commands) is not there inside;
    # the control: it works from the host.
    assert "HEADLESS-1" in desktop.swaymsg("get_outputs")
    ipc = qnix(host, "run", "personal", "--", "test", "-e", str(desktop.ipc))
    assert ipc.returncode == 1
    runtime_dir = qnix(host, "run", "personal", "--", "test", "-e", str(desktop.run))
    assert runtime_dir.returncode == 1

    # An app inside: its window carries the compartment, whatever it claims.
    app = subprocess.Popen(
        [
            QNIX,
            "run",
            "--gui",
            "personal",
            "--",
            need("foot"),
            "--app-id",
            "qnix-banking.x",
            "--fullscreen",
            "-e",
            "sleep",
            "600",
        ],
        env={**host.env, **display},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        window = desktop.window("qnix-personal.")
        assert (window["app_id"], window["fullscreen_mode"]) == ("qnix-personal.qnix-banking.x", 0)
        # In a scope of its own, with what it started.
        (scope,) = app_scopes(host, "personal").values()
        assert {"foot", "sleep"} <= scope
        # An agent that lies about the pid cannot have a host process moved.
        top = cgroups.cgroup_of(host.paths.cgroup_name("personal"), cgroups.detect())
        with pytest.raises(QnixError, match="no process"):
            cgroups.scope(cgroup_tree(top), "app-lie", os.getpid())
        # Nothing to capture the screen with inside.
        grim = qnix(host, "run", "--gui", "personal", "--", need("grim"), "/tmp/x.png", **display)
        assert grim.returncode != 0
        assert "doesn't support wlr-screencopy" in grim.stderr
    finally:
        app.terminate()
        app.wait(30)
    # A killed `qnix run` takes its app along; the empty scope goes with the compartment.
    wait_for(lambda: not any(app_scopes(host, "personal").values()), "the app to end")

    stopped = qnix(host, "stop", "personal")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not filters(host), "the filter to end with the compartment")


def test_run_gui_refuses_a_compartment_without_gui(host: LiveHost, desktop: Desktop) -> None:
    result = qnix(
        host, "run", "--gui", "plain", "--", "true", QNIX_WAYLAND_DISPLAY=str(desktop.display)
    )
    assert result.returncode == 1
    assert "error: compartment plain has no GUI" in result.stderr
    assert "set gui = true for plain" in result.stderr


def test_run_gui_refuses_x11(host: LiveHost) -> None:
    result = qnix(host, "run", "--gui", "personal", "--", "true", DISPLAY=":0")
    assert result.returncode == 1
    assert "X11 apps are not supported" in result.stderr


def test_a_gui_container_gets_the_same_filter(desktop: Desktop, host: LiveHost) -> None:
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    started = qnix(host, "start", "boxed", **display)
    assert started.returncode == 0, started.stderr
    assert len(filters(host)) == 1
    listing = qnix(host, "run", "boxed", "--", "ls", "-A", "/run/user/1000")
    assert (listing.returncode, listing.stdout) == (0, "wayland-0\n")
    ipc = qnix(host, "run", "boxed", "--", "test", "-e", str(desktop.ipc))
    assert ipc.returncode == 1
    app = subprocess.Popen(
        [QNIX, "run", "--gui", "boxed", "--", need("foot"), "--app-id", "x", "-e", "sleep", "600"],
        env={**host.env, **display},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert desktop.window("qnix-boxed.")["app_id"] == "qnix-boxed.x"
        (scope,) = app_scopes(host, "boxed").values()
        assert {"foot", "sleep"} <= scope
    finally:
        app.terminate()
        app.wait(30)
    stopped = qnix(host, "stop", "boxed")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not filters(host), "the filter to end with the container")


def test_a_gui_disposable_gets_its_filter(desktop: Desktop, host: LiveHost) -> None:
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    listing = qnix(host, "dispose", "-t", "gui-dvm", "--", "ls", "-A", "/run/user/1000", **display)
    assert (listing.returncode, listing.stdout) == (0, "wayland-0\n"), listing.stderr
    host.disposables_gone()
    wait_for(lambda: not filters(host), "the filter to end with the disposable")


def test_a_gui_app_in_a_disposable(desktop: Desktop, host: LiveHost) -> None:
    """`qnix dispose --gui TEMPLATE -- APP`: the disposable's own filter shows the app, named
    after the disposable; the filter ends with it."""
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    app = subprocess.Popen(
        [QNIX, "dispose", "--gui", "gui-dvm", "--", need("foot"), "-e", "sleep", "600"],
        env={**{k: v for k, v in host.env.items() if k != "WAYLAND_DISPLAY"}, **display},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # A disposable made for the call (sandbox, link, filter): slower than a window alone.
        try:
            window = desktop.window("qnix-disp", timeout=60)
        except AssertionError:
            app.terminate()
            _, error = app.communicate(timeout=30)
            shown = [w.get("app_id") for w in desktop.tree()]
            raise AssertionError(
                f"no window among {shown}; qnix dispose said: {error.decode()!r}"
            ) from None
        matched = re.fullmatch(r"qnix-(disp[0-9]+)[.]foot", str(window["app_id"]))
        assert matched is not None, window["app_id"]
        name = matched.group(1)
        assert host.paths.run_dir(name).is_dir()
        assert len(filters(host)) == 1
        (scope,) = app_scopes(host, name).values()
        assert {"foot", "sleep"} <= scope
    finally:
        app.terminate()
        app.wait(30)
    host.disposables_gone()
    wait_for(lambda: not filters(host), "the filter to end with the disposable")
    gone = str(window["app_id"])
    wait_for(lambda: all(w.get("app_id") != gone for w in desktop.tree()), "the window to go")


def test_dispose_gui_refuses_a_template_without_gui(desktop: Desktop, host: LiveHost) -> None:
    display = {"QNIX_WAYLAND_DISPLAY": str(desktop.display)}
    result = qnix(host, "dispose", "--gui", "cli-dvm", "--", "true", **display)
    assert result.returncode == 1
    assert "error: disposable template cli-dvm has no GUI" in result.stderr
    # The control: the same template runs the command without --gui.
    assert qnix(host, "dispose", "--template", "cli-dvm", "--", "true").returncode == 0
    x11 = qnix(host, "dispose", "--gui", "gui-dvm", "--", "true", DISPLAY=":0")
    assert x11.returncode == 1
    assert "X11 apps are not supported" in x11.stderr
    host.disposables_gone()


def test_the_filter_dies_with_a_killed_keeper(desktop: Desktop, host: LiveHost) -> None:
    started = qnix(host, "start", "personal", QNIX_WAYLAND_DISPLAY=str(desktop.display))
    assert started.returncode == 0, started.stderr
    assert len(filters(host)) == 1
    state = json.loads(host.paths.state_file("personal").read_text())
    os.kill(state["keeper_pid"], signal.SIGKILL)
    wait_for(lambda: not filters(host), "the filter to end with its keeper")
    assert qnix(host, "gc").returncode == 0


def test_the_filter_never_runs_as_root(tmp_path: Path) -> None:
    """A compositor whose socket is root's would have the filter parse as root: refused."""
    compositor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    compositor.bind(str(tmp_path / "wayland-9"))
    try:
        with pytest.raises(QnixError, match="belongs to root"):
            waylandproxy.start(
                tmp_path, str(tmp_path / "wayland-9"), "personal", fullscreen=False, host_gid=1
            )
        assert not (tmp_path / waylandproxy.FOLDER_NAME).exists()
    finally:
        compositor.close()
