"""A real desktop for the filter's tests: sway 1.7 headless (pixman, no GPU) run by a test user
made for it, clients run as that user on the compositor's raw socket or through a filter."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, need

TIMEOUT = 20.0
# The system's interpreter, which has GTK4's introspection: Debian's (python3-gi,
# gir1.2-gtk-4.0), or on NixOS the shell's python3 (shell.nix gives it pygobject3 and gtk4).
GTK_PYTHON = (
    "/usr/bin/python3"
    if Path("/usr/bin/python3").exists()
    else shutil.which("python3") or "python3"
)


# wl-clipboard without data-control maps a window for focus and can lose the race with a busy
# sway configuring it (the tests' RACE): tried again, each time a little later.
CLIPBOARD_ATTEMPTS = 8


def pause_before_retry(attempt: int) -> None:
    time.sleep(0.2 * (attempt + 1))


def wait_for(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Desktop:
    def __init__(self, root: Path, include: str = "") -> None:
        """`include`: a sway config fragment the config includes (as a file of its own)."""
        self.root = root
        self.include = include
        self.user = "qnixgui" + secrets.token_hex(3)
        self.processes: list[subprocess.Popen[bytes]] = []
        # Each filter started by `filter`, by compartment.
        self.filters: dict[str, subprocess.Popen[bytes]] = {}
        root.chmod(0o755)
        self.home = root / "home"
        self.run = root / "run"
        subprocess.run(
            [need("useradd"), "-M", "-d", str(self.home), "-s", "/usr/sbin/nologin", self.user],
            check=True,
        )
        entry = pwd.getpwnam(self.user)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.display = self.ipc = Path()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        root = self.root
        for folder in (self.home, self.run):
            folder.mkdir(mode=0o700)
            os.chown(folder, self.uid, self.gid)
        config = root / "sway.config"
        config.write_text("output HEADLESS-1 resolution 640x480\ndefault_border none\n")
        if self.include:
            fragment = root / "include.config"
            fragment.write_text(self.include)
            fragment.chmod(0o644)
            with config.open("a") as appended:
                appended.write(f"include {fragment}\n")
        self.sway = self.spawn(
            [need("sway"), "-c", str(config)],
            self.run,
            WLR_BACKENDS="headless",
            WLR_RENDERER="pixman",
            WLR_LIBINPUT_NO_DEVICES="1",
        )
        wait_for(lambda: self._sockets("wayland-*[0-9]") and self._sockets("sway-ipc.*"), "sway")

        self.display = self._sockets("wayland-*[0-9]")[0]
        self.ipc = self._sockets("sway-ipc.*")[0]
        self.keyboard = self.new_keyboard()

    def new_keyboard(self) -> subprocess.Popen[bytes]:
        """Headless sway has no keyboard, and clients that need keyboard focus (wl-paste, wl-copy
        without data-control) wait for its keymap: a virtual keyboard that only sleeps is one.
        When another virtual keyboard (wtype) types and goes, the seat is left without a
        keymap: call this again."""
        previous = getattr(self, "keyboard", None)
        if previous is not None:
            previous.terminate()
            previous.wait(TIMEOUT)
        keyboard = self.spawn([need("wtype"), "-s", "3600000"], self.run)
        wait_for(lambda: "keyboard" in self.swaymsg("get_inputs"), "the virtual keyboard")
        return keyboard

    def _sockets(self, pattern: str) -> list[Path]:
        return sorted(p for p in self.run.glob(pattern) if p.is_socket())

    def env(self, runtime_dir: Path, **extra: str) -> dict[str, str]:
        display = self.display.name if runtime_dir == self.run else "wayland-0"
        if not display:
            return {
                "HOME": str(self.home),
                "PATH": "/usr/bin:/bin",
                "XDG_RUNTIME_DIR": str(runtime_dir),
                **extra,
            }
        return {
            "HOME": str(self.home),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(runtime_dir),
            "WAYLAND_DISPLAY": display,
            **extra,
        }

    def _as_user(self, argv: list[str]) -> list[str]:
        return [
            need("setpriv"),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            *argv,
        ]

    def spawn(self, argv: list[str], runtime_dir: Path, **extra: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            self._as_user(argv),
            env=self.env(runtime_dir, **extra),
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.processes.append(process)
        return process

    def run_as_user(
        self, argv: list[str], runtime_dir: Path, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self._as_user(argv),
            env=self.env(runtime_dir),
            cwd=self.home,
            input=input,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )

    def filter(self, compartment: str, *, fullscreen: bool = False) -> Path:
        """A Wayland filter for `compartment`; the folder holding its socket (wayland-0)."""
        folder = self.root / f"filter-{compartment}"
        folder.mkdir(mode=0o700)
        os.chown(folder, self.uid, self.gid)
        argv = [
            sys.executable,
            "-m",
            "qnix.runtime.waylandproxy",
            "--listen",
            str(folder / "wayland-0"),
            "--upstream",
            str(self.display),
            "--compartment",
            compartment,
            "--user",
            f"{self.uid}:{self.gid}",
            "--socket-group",
            str(self.gid),
            *(["--fullscreen"] if fullscreen else []),
        ]
        with (self.root / f"filter-{compartment}.log").open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        self.processes.append(process)
        self.filters[compartment] = process
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        return folder

    def gtk_window(
        self, runtime_dir: Path, app_id: str, title: str, *, stay: bool = True
    ) -> subprocess.Popen[bytes]:
        """A GTK4 window (tests/wayland/gtk_window.py, cairo renderer: no GPU) on the display
        in `runtime_dir`; it prints `frame` once its first frame is on the compositor."""
        script = Path(__file__).with_name("gtk_window.py")
        return self.spawn(
            [GTK_PYTHON, "-I", str(script), app_id, title, *(["--stay"] if stay else [])],
            runtime_dir,
            GSK_RENDERER="cairo",
            GDK_BACKEND="wayland",
            GTK_A11Y="none",
            NO_AT_BRIDGE="1",
        )

    def rss_kib(self, compartment: str) -> int:
        """The resident memory of the filter of `compartment` (VmRSS, KiB)."""
        status = Path(f"/proc/{self.filters[compartment].pid}/status").read_text()
        (line,) = (line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1])

    def swaymsg(self, kind: str) -> str:
        result = self.run_as_user([need("swaymsg"), "-s", str(self.ipc), "-t", kind], self.run)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode()

    def screenshot(self) -> tuple[int, int, bytes]:
        """The whole output, by grim on the raw socket: (width, height, R G B rows)."""
        shot = self.run_as_user([need("grim"), "-t", "ppm", "-"], self.run)
        assert shot.returncode == 0, shot.stderr
        header_end = shot.stdout.index(b"255\n") + 4
        magic, width, height, _depth = shot.stdout[:header_end].split()
        assert magic == b"P6"
        return int(width), int(height), shot.stdout[header_end:]

    def filter_log(self, compartment: str) -> str:
        """Why the filter of `compartment` ended clients, so far."""
        return (self.root / f"filter-{compartment}.log").read_text()

    def tree(self) -> list[dict[str, object]]:
        """Every window sway holds (get_tree, flattened)."""
        windows: list[dict[str, object]] = []

        def walk(node: dict[str, object]) -> None:
            if node.get("pid"):
                windows.append(node)
            for key in ("nodes", "floating_nodes"):
                for child in node.get(key, []):  # type: ignore[attr-defined]
                    walk(child)

        walk(json.loads(self.swaymsg("get_tree")))
        return windows

    def window(self, app_id_prefix: str, timeout: float = TIMEOUT) -> dict[str, object]:
        """The window whose app id starts with `app_id_prefix`, once it is mapped."""
        found: list[dict[str, object]] = []

        def mapped() -> bool:
            found[:] = [w for w in self.tree() if str(w.get("app_id")).startswith(app_id_prefix)]
            return bool(found)

        wait_for(mapped, f"a window {app_id_prefix}*", timeout)
        return found[0]

    def close_window(self, process: subprocess.Popen[bytes], app_id: str) -> None:
        process.terminate()
        process.wait(TIMEOUT)
        wait_for(lambda: not [w for w in self.tree() if w.get("app_id") == app_id], "no window")

    def user_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and entry.stat().st_uid == self.uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                continue
        return pids

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        # What the clients forked (foot's shells) ends with the test user, by pid.
        for pid in self.user_pids():
            os.kill(pid, signal.SIGKILL)
        subprocess.run([need("userdel"), self.user], check=True)
        for log in self.root.glob("filter-*.log"):
            if log.stat().st_size:
                print(f"{log.name}:\n{log.read_text()}")
        shutil.rmtree(self.root, ignore_errors=True)
