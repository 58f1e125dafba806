"""Benchmarks: figures measured side by side in one run (not timed tests)."""
