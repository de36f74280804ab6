"""`qnix` with one compartment's side of the broker rigged, as that compartment's own user can
rig it (by ptrace, through /proc/PID/fd, with processes of its own): every qnix program the
broker runs there goes through a shell snippet, which gets the real command as "$@".

    python -m tests.broker.rigged NAME SNIPPET QNIX-ARGS...
"""

from __future__ import annotations

import sys

from qnix.broker.programs import Running
from qnix.cli.main import cli


def main() -> None:
    name, snippet, *args = sys.argv[1:]
    program = Running.program

    def rigged(self: Running, file: str, *rest: str) -> list[str]:
        argv = program(self, file, *rest)
        return ["sh", "-c", snippet, "rigged", *argv] if self.name == name else argv

    Running.program = rigged  # type: ignore[method-assign]
    cli.main(args, prog_name="qnix")


if __name__ == "__main__":
    main()
