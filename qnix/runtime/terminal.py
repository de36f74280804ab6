"""The host's half of an interactive `qnix run`: our terminal relayed to one of the compartment's.

Passing our terminal's descriptor into a compartment would let it change our terminal's modes
and, where the kernel still allows TIOCSTI, type into our shell. Instead the agent opens a
pseudo-terminal inside the compartment (its own /dev/pts), makes it the command's controlling
terminal — so job control, ^C and ^Z work there — and hands us its master side. We put our
terminal in raw mode, copy bytes both ways, pass on size changes (SIGWINCH), and restore our
terminal however the command ends.

Imported only when stdin and stdout are a terminal: `qnix run` in a pipe does without it.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import select
import signal
import stat
import termios
import tty
from collections.abc import Iterator, Sequence
from types import FrameType

CHUNK = 65536


def size(fd: int) -> tuple[int, int]:
    """Rows and columns of the terminal at `fd` (0, 0 when it has none)."""
    try:
        rows, cols = termios.tcgetwinsize(fd)
    except (OSError, termios.error):
        return 0, 0
    return rows, cols


def checked_master(untrusted_fds: Sequence[int]) -> int:
    """The one descriptor the agent sent with `started`: a character device (a pty master)."""
    if len(untrusted_fds) != 1 or not stat.S_ISCHR(os.fstat(untrusted_fds[0]).st_mode):
        for fd in untrusted_fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "the agent sent no terminal")
    return untrusted_fds[0]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield  # not a terminal after all: nothing to put in raw mode
        return
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what the user typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _resizes_follow(ours: int, master: int) -> Iterator[None]:
    def resize(number: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetwinsize(master, termios.tcgetwinsize(ours))

    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _drain(master: int, stdout: int) -> None:
    """What the command wrote just before it ended."""
    os.set_blocking(master, False)
    with contextlib.suppress(OSError):
        while data := os.read(master, CHUNK):
            os.write(stdout, data)


def relay(sock: _socket.socket, master: int, stdin: int, stdout: int) -> None:
    """Copy between our terminal and the compartment's until the agent speaks again (the
    command ended). The agent's message stays unread for the caller."""
    watched = [stdin, master, sock.fileno()]
    with _raw(stdin), _resizes_follow(stdout, master):
        while True:
            try:
                readable, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if sock.fileno() in readable:
                _drain(master, stdout)
                return
            if master in readable:
                try:
                    data = os.read(master, CHUNK)
                except OSError as exc:  # EIO: every holder of the terminal closed it
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if data:
                    os.write(stdout, data)
                else:
                    watched.remove(master)
            if stdin in readable:
                data = os.read(stdin, CHUNK)
                if data:
                    os.write(master, data)
                else:
                    watched.remove(stdin)  # our input ended; the command's goes on
