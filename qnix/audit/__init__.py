"""The audit trail: every lifecycle event and decision, one JSON line each."""
