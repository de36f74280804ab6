"""Pure compilation: a validated Workstation to Artifacts (file path -> bytes)."""
