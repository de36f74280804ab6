"""PID 1 of a container compartment (standard library only: it runs inside as a lone file).

`python3 -I -S init.py PROGRAM [ARGS...]` starts PROGRAM (the agent) as its child, reaps every
process the kernel hands it (a pid namespace's orphans go to its PID 1, and a zombie nobody
reaps counts against the compartment's pids limit until the container ends), passes SIGTERM,
SIGINT and SIGHUP on to the program, and ends with the program's exit code, which ends the
container. It runs as the compartment's user, like everything else inside: nspawn's own stub
init (--as-pid2) would run as the container's root.
"""

from __future__ import annotations

import os
import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: init.py PROGRAM [ARGS...]\n")
        return 2
    program = os.fork()
    if program == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)

    def forward(number: int, frame: object) -> None:
        try:  # noqa: SIM105 - contextlib is not worth importing here
            os.kill(program, number)
        except ProcessLookupError:
            pass

    # Until these are set a signal is ignored (PID 1 has no default actions), never lost work.
    for number in FORWARDED:
        signal.signal(number, forward)
    while True:
        try:
            pid, status = os.wait()  # any child: the program or an orphan
        except ChildProcessError:
            return 1
        if pid == program:
            return exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
