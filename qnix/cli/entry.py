"""The `qnix` console script. `qnix run` on a running compartment and `qnix dispose` with a
preloaded disposable take a path that loads no CLI framework (see qnix.runtime.quickrun);
everything else goes to the click commands."""

from __future__ import annotations

import sys


def main() -> None:
    from qnix.runtime.quickrun import dispose_fast, run_fast

    code = run_fast(sys.argv[1:])
    if code is None:
        code = dispose_fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from qnix.cli.main import cli

    cli.main(prog_name="qnix")
