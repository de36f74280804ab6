"""Isolation backends: each starts and stops a compartment and gives the host a channel to its
agent. `namespace` (bubblewrap) is the default level."""
