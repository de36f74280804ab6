"""A compartment's own clipboard, for the host's global one (Qubes' Ctrl-Shift-C / Ctrl-Shift-V).

Runs inside compartments as a lone file (`python3 -I -S /opt/qnix-agent/clipboard.py ...`),
standard library only.

  get [--max-bytes N]   the compartment's clipboard on stdout (at most N+1 bytes, so that the
                        host can tell "too large" from "just fits")
  set [--max-bytes N]   stdin becomes the compartment's clipboard

The clipboard is the file `$XDG_RUNTIME_DIR/qnix-clipboard` (0600; the runtime folder is a
tmpfs that lives as long as the compartment), or `~/.local/state/qnix/clipboard` without a
runtime folder. Programs inside use it with the same two commands. When a display is there,
the display's clipboard is used too: `wl-paste`/`wl-copy` under Wayland, `xclip` under X11,
whichever is installed; `get` prefers the display's, `set` writes both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence

DEFAULT_MAX_BYTES = 64 * 1024
FILE_NAME = "qnix-clipboard"
DISPLAY_TIMEOUT = 5.0


def clipboard_file() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/") and os.path.isdir(runtime):
        return os.path.join(runtime, FILE_NAME)
    return os.path.join(os.path.expanduser("~"), ".local", "state", "qnix", "clipboard")


def display_commands() -> tuple[list[str], list[str]] | None:
    """(get, set) for the display's clipboard, or None without a display or a tool."""
    if os.environ.get("WAYLAND_DISPLAY") and shutil.which("wl-paste") and shutil.which("wl-copy"):
        return ["wl-paste", "--no-newline"], ["wl-copy"]
    if os.environ.get("DISPLAY") and shutil.which("xclip"):
        return (
            ["xclip", "-selection", "clipboard", "-out"],
            ["xclip", "-selection", "clipboard", "-in"],
        )
    return None


def read_file(path: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        remaining = limit
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 16))):
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    """Through a temporary file and a rename: a reader never sees half of it."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".qnix-clipboard-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def get(limit: int) -> bytes:
    display = display_commands()
    if display is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                display[0], capture_output=True, timeout=DISPLAY_TIMEOUT, check=False
            )
            if result.returncode == 0 and result.stdout:
                return result.stdout[:limit]
    return read_file(clipboard_file(), limit)


def put(data: bytes) -> None:
    write_file(clipboard_file(), data)
    display = display_commands()
    if display is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(display[1], input=data, timeout=DISPLAY_TIMEOUT, check=False)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipboard")
    parser.add_argument("command", choices=("get", "set"))
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    try:
        if args.command == "get":
            data = get(args.max_bytes + 1)
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]
            return 0
        data = sys.stdin.buffer.read(args.max_bytes + 1)
        if len(data) > args.max_bytes:
            sys.stderr.write(f"clipboard: more than {args.max_bytes} bytes: refused\n")
            return 1
        put(data)
        return 0
    except OSError as exc:
        sys.stderr.write(f"clipboard: {exc.strerror or exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
