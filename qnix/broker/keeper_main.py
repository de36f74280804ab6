"""`python -I -m qnix.broker.keeper_main KEEPER_JSON`: a compartment's keeper process;
`... --spawner STATE_ROOT RUN_ROOT PREFIX HOST_NETNS`: the resident process that forks
disposables' keepers (qnix.runtime.spawner).

The runtime's keeper (qnix.runtime.keeper) runs the compartment; the call server beside it
(qnix.broker.calls) answers the calls the compartment makes. The runtime imports nothing of the
broker: this module, above both, puts the two together.
"""

from __future__ import annotations

import sys

from qnix.broker import calls
from qnix.runtime import keeper, spawner


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--spawner"] and len(argv) == 6:
        return spawner.serve(spawner.paths_of(argv[2:]), calls.serve_in_background)
    return keeper.main(argv, serve_calls=calls.serve_in_background)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
