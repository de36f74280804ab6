"""The NixOS flake: the one escaping printer, value trees, and one emitter per concern."""
