"""qnix: Qubes-style compartments for NixOS and other Linux workstations."""

__version__ = "0.1.0"
