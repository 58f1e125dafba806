"""The same federated run without Flower (``backend=inprocess``), timed for the benchmarks.

Clients train in a pool of spawned worker processes (which import torch afresh, as Ray
actors do), or in this process with ``processes=0``; the task/round loop, strategies,
evaluation and messages are the ServerApp's own (:mod:`fedcil.cli.inprocess`).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

from fedcil.config import compose_config, quote_value
from fedcil.cli.inprocess import run_inprocess


@dataclass
class PlainRun:
    """Accuracy matrix and timings of a plain-loop run."""

    accuracy_matrix: list[list[float]]
    round_seconds: list[float]
    first_round_start: float  # seconds from the call to the start of round 1
    wall_seconds: float


def run_plain(config_name: str, overrides: list[str], processes: int) -> PlainRun:
    """Run every task and round of the config; ``processes=0`` trains in this process."""
    started = time.monotonic()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fcil-plain-") as out, (
        ProcessPoolExecutor(processes, mp_context=spawn) if processes else nullcontext()
    ) as pool:
        cfg = compose_config(config_name, [*overrides, f"output_dir={quote_value(out)}"])
        results = run_inprocess(cfg, pool)
        loop_end = time.monotonic()
    return PlainRun(
        accuracy_matrix=results["accuracy_matrix"],
        round_seconds=[r["seconds"] for r in results["rounds"]],
        first_round_start=loop_end - started - results["wall_seconds"] + results["setup_seconds"],
        wall_seconds=time.monotonic() - started,
    )
