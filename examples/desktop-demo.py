"""The GUI half of `make demo`: a window in work and one in banking, each with its label's
colour, and a screenshot of them in build/desktop.png.

Run after `qnix apply examples/smb-office.toml` (as root), with the qnix command as argument.
With a Wayland session (WAYLAND_DISPLAY) the windows open there; its sway shows the colours
once it has read /etc/sway/config.d/50-qnix-labels.conf (`swaymsg reload`). Without one, sway
runs headless (no GPU: pixman) as a throw-away user, with the fragment `qnix apply` wrote, and
is gone afterwards. With neither, the GUI part is skipped for lack of a display.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPARTMENTS = ("work", "banking")
SCREENSHOT = Path("build/desktop.png")
FRAGMENT = Path("/etc/sway/config.d/50-qnix-labels.conf")
TIMEOUT = 30.0
FOOT = shutil.which("foot") or "foot"


def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


class HeadlessSway:
    """sway 1.7 headless, run by a user made for it (sway refuses root)."""

    def __init__(self) -> None:
        self.user = "qnixdemo" + secrets.token_hex(3)
        self.root = Path(tempfile.mkdtemp(prefix="qnix-desktop-demo-"))
        self.root.chmod(0o755)
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", self.user], check=True)
        entry = pwd.getpwnam(self.user)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.run = self.root / "run"
        self.run.mkdir(mode=0o700)
        os.chown(self.run, self.uid, self.gid)
        config = self.root / "sway.config"
        config.write_text(
            "output HEADLESS-1 resolution 800x500\ndefault_border none\n"
            + (f"include {FRAGMENT}\n" if FRAGMENT.exists() else "")
        )
        self.sway = subprocess.Popen(
            self.as_user(["sway", "-c", str(config)]),
            env=self.env(
                WLR_BACKENDS="headless", WLR_RENDERER="pixman", WLR_LIBINPUT_NO_DEVICES="1"
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.socket("wayland-*[0-9]") and self.socket("sway-ipc.*"), "sway")
        self.display = self.socket("wayland-*[0-9]")

    def socket(self, pattern: str) -> Path | None:
        found = sorted(p for p in self.run.glob(pattern) if p.is_socket())
        return found[0] if found else None

    def as_user(self, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "HOME": str(self.root),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(self.run),
            **extra,
        }

    def app_ids(self) -> list[str]:
        ipc = self.socket("sway-ipc.*")
        tree = subprocess.run(
            self.as_user(["swaymsg", "-s", str(ipc), "-t", "get_tree"]),
            env=self.env(),
            capture_output=True,
            check=True,
        ).stdout
        found: list[str] = []

        def walk(node: dict[str, object]) -> None:
            if node.get("app_id"):
                found.append(str(node["app_id"]))
            for key in ("nodes", "floating_nodes"):
                for child in node.get(key, []):  # type: ignore[attr-defined]
                    walk(child)

        walk(json.loads(tree))
        return found

    def screenshot(self, target: Path) -> None:
        shot = self.run / "desktop.png"  # a folder the user may write in
        subprocess.run(
            self.as_user(["grim", str(shot)]),
            env=self.env(WAYLAND_DISPLAY=self.display.name),
            check=True,
        )
        shutil.copyfile(shot, target)

    def close(self) -> None:
        self.sway.terminate()
        self.sway.wait(10)
        for entry in Path("/proc").iterdir():  # what sway started, by pid
            try:
                if entry.name.isdigit() and entry.stat().st_uid == self.uid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                continue
        subprocess.run(["userdel", self.user], check=True)
        shutil.rmtree(self.root, ignore_errors=True)


def session_display() -> Path | None:
    name = os.environ.get("WAYLAND_DISPLAY")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not name:
        return None
    path = Path(name) if name.startswith("/") else Path(runtime or "/nonexistent") / name
    return path if path.is_socket() else None


def show(qnix: str, display: Path, headless: HeadlessSway | None) -> None:
    env = {**os.environ, "QNIX_WAYLAND_DISPLAY": str(display)}
    env.pop("DISPLAY", None)
    windows = []
    try:
        for name in COMPARTMENTS:
            # Started again from here, so that its filter serves this display.
            subprocess.run([qnix, "stop", name], env=env, capture_output=True, check=False)
            subprocess.run([qnix, "start", name], env=env, check=True)
            windows.append(
                subprocess.Popen(
                    [qnix, "run", "--gui", name, "--", FOOT, "-e", "sleep", "600"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        if headless is not None:
            for name in COMPARTMENTS:
                wait_for(
                    lambda n=name: any(a.startswith(f"qnix-{n}.") for a in headless.app_ids()),
                    f"a window of {name}",
                )
            time.sleep(1)  # their first frames
            SCREENSHOT.parent.mkdir(exist_ok=True)
            headless.screenshot(SCREENSHOT)
            print(f"ok: a window in work and one in banking; screenshot {SCREENSHOT}")
        else:
            time.sleep(3)
            subprocess.run(["grim", str(SCREENSHOT)], check=False)
            print(f"ok: a window in work and one in banking on {display}; {SCREENSHOT}")
    finally:
        for window in windows:
            window.terminate()
            window.wait(10)


def main() -> None:
    qnix = sys.argv[1] if len(sys.argv) > 1 else "qnix"
    display = session_display()
    if display is not None:
        show(qnix, display, None)
        return
    if not (shutil.which("sway") and shutil.which("grim") and shutil.which("foot")):
        print("skipped: no Wayland display, and no sway, grim and foot to run one headless")
        return
    headless = HeadlessSway()
    try:
        assert headless.display is not None
        show(qnix, headless.display, headless)
    finally:
        headless.close()


if __name__ == "__main__":
    main()
