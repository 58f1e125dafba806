"""Benchmarks: figures measured side by side in one run (not timed tests)."""

import json
from datetime import datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_result(name: str, result: dict, folder: Path = RESULTS_DIR) -> Path:
    """Write ``result`` to ``<folder>/<name>-<time>.json`` (default ``bench/results/``) and say where."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")
    return out
