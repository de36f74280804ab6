"""`python -m qnix.runtime.refill STATE_ROOT RUN_ROOT`: top up the preloaded disposables.

Started detached by `qnix dispose` after it used a preloaded one, so the next is warm."""

from __future__ import annotations

import sys

from qnix.errors import QnixError
from qnix.runtime import disposables
from qnix.runtime.paths import RuntimePaths


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m qnix.runtime.refill STATE_ROOT RUN_ROOT", file=sys.stderr)
        return 2
    paths = RuntimePaths.from_options(argv[1], argv[2])
    try:
        disposables.refill_pools(paths)
    except QnixError as exc:
        print(f"refill: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
