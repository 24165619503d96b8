"""Config-driven training (filled in by later work)."""
