"""Input scanners: one small interface each, `scan(text) -> Verdict`."""
