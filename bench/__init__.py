"""Benchmarks: figures measured side by side in one run (not timed tests)."""

import json
from datetime import datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_result(name: str, result: dict) -> Path:
    """Write ``result`` to ``bench/results/<name>-<time>.json`` and say where."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")
    return out
