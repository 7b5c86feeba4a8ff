"""Peers that the benchmark runs from venvs of their own (not imported by the harness)."""
