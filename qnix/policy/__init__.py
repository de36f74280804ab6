"""Qubes 4.1+ policy: `parse` (lines to typed rules), `load` (policy.d folders and their
includes), `evaluate` (one request against a snapshot of the system; pure)."""
