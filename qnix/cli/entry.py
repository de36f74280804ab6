"""The `qnix` console script. `qnix run` on a running compartment and `qnix dispose` with a
preloaded disposable take a path that loads no CLI framework (see qnix.runtime.quickrun);
everything else goes to the click commands."""

from __future__ import annotations

import os
import sys


def main() -> None:
    from qnix.runtime.quickrun import dispose_fast, run_fast

    code = run_fast(sys.argv[1:])
    if code is None:
        code = dispose_fast(sys.argv[1:])
    if code is not None:
        # The fast path holds nothing that needs the interpreter's teardown (its sockets and
        # the audit log are closed by now, or by the kernel), and that teardown costs more
        # than the path itself: ~4 ms of freeing modules before exit.
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105 - contextlib would be one more import on the fast path
                stream.flush()
            except OSError:  # its reader is gone: nothing left to tell it
                pass
        os._exit(code)
    from qnix.cli.main import cli

    cli.main(prog_name="qnix")
