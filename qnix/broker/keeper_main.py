"""`python -I -m qnix.broker.keeper_main KEEPER_JSON`: a compartment's keeper process.

The runtime's keeper (qnix.runtime.keeper) runs the compartment; the call server beside it
(qnix.broker.calls) answers the calls the compartment makes. The runtime imports nothing of the
broker: this module, above both, puts the two together.
"""

from __future__ import annotations

import sys

from qnix.broker import calls
from qnix.runtime import keeper

if __name__ == "__main__":
    sys.exit(keeper.main(sys.argv, serve_calls=calls.serve_in_background))
