"""The subprocess funnel, by the name the runtime's modules import it under. It lives in
qnix.runner, below every layer, because loading a .nix spec runs nix-instantiate too."""

from qnix.runner import Result, require_tool, run

__all__ = ["Result", "require_tool", "run"]
