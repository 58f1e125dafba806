"""Framework overhead and scaling of the Flower simulation, measured side by side.

    .venv/bin/python -m bench.overhead                 # 10 clients + scaling 10/50/100
    .venv/bin/python -m bench.overhead --scaling ""    # overhead only

1. Overhead: the same federated run (same clients, data, epochs, model) once as a real
   Flower simulation (``fcil-run`` machinery: local SuperLink, Ray, one actor per core)
   and once as a plain loop with one worker process per core. Reported: total wall time and
   its ratio, start-up (time before the first round, plus the first round's excess over a
   steady round: imports, Ray and worker start), steady seconds per round (median of the
   rounds after the first), and the peak memory (PSS) of each whole process tree.
2. Scaling: seconds per round and peak memory of the Flower simulation with 10, 50 and 100
   simulated clients (one task, three rounds).

Results are printed and written to ``bench/results/overhead-<time>.json``; the previous
file there, if any, is printed alongside for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path

import psutil

from bench.memory import PeakMemory
from bench.plain_loop import run_plain
from fedcil.cli.run import FlowerSite, launch, listening_process

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {"wall_ratio": 1.5, "flower_startup_s": 10.0}
BASE = ["eval_every_round=false", "client_resources.num_cpus=1"]


def superlink_roots(port: int) -> list[psutil.Process]:
    """The (detached) SuperLink listening on ``port``, if it is up."""
    proc = listening_process(port)
    return [proc] if proc else []


def steady(seconds: list[float]) -> float:
    """Median round time after the first round (the first carries the start-up)."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def measure_flower(overrides: list[str], log_file: Path) -> dict:
    """One Flower simulation: wall, start-up, steady s/round, peak memory, accuracy matrix."""
    with tempfile.TemporaryDirectory(prefix="fcil-bench-") as tmp:
        site = FlowerSite.isolated(Path(tmp) / "flwr-home")
        out = Path(tmp) / "run"
        started, start_epoch = time.monotonic(), time.time()
        with PeakMemory(lambda: superlink_roots(site.port)) as memory, open(log_file, "a") as log:
            with redirect_stdout(log):
                launch("config", [*overrides, f"output_dir={out}"], site=site)
        wall = time.monotonic() - started
        results = json.loads((out / "results.json").read_text())
    rounds = [r["seconds"] for r in results["rounds"]]
    before_first = results["started_at"] + results["setup_seconds"] - start_epoch
    return {
        "wall_s": wall,
        "startup_s": before_first + rounds[0] - steady(rounds),
        "steady_round_s": steady(rounds),
        "peak_memory_mb": memory.peak / 2**20,
        "accuracy_matrix": results["accuracy_matrix"],
    }


def measure_plain(overrides: list[str], processes: int) -> dict:
    """The same run as a plain loop with ``processes`` workers."""
    started = time.monotonic()
    with PeakMemory() as memory:
        run = run_plain("config", overrides, processes)
    rounds = run.round_seconds
    return {
        "wall_s": time.monotonic() - started,
        "startup_s": run.first_round_start + rounds[0] - steady(rounds),
        "steady_round_s": steady(rounds),
        "peak_memory_mb": memory.peak / 2**20,
        "accuracy_matrix": [[*row, *[None] * (len(run.accuracy_matrix) - len(row))] for row in run.accuracy_matrix],
    }


def previous_result() -> dict | None:
    """The most recent earlier benchmark file, if any."""
    files = sorted(RESULTS_DIR.glob("overhead-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--scaling", default="10,50,100", help="client counts for the scaling runs ('' to skip)")
    parser.add_argument("--overrides", default="num_tasks=2 rounds_per_task=4", help="extra config overrides")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    log_file = RESULTS_DIR / "last-run.log"
    RESULTS_DIR.mkdir(exist_ok=True)
    log_file.write_text("")
    overrides = [*BASE, *args.overrides.split(), f"num_clients={args.clients}"]
    print(f"overhead: {args.clients} clients, {cores} cores, overrides: {' '.join(overrides)} (Flower logs: {log_file})")

    flower = measure_flower(overrides, log_file)
    plain = measure_plain(overrides, processes=cores)
    report = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "cores": cores,
        "overrides": overrides,
        "flower": flower,
        "plain": plain,
        "wall_ratio": flower["wall_s"] / plain["wall_s"],
        "steady_ratio": flower["steady_round_s"] / plain["steady_round_s"],
        "memory_ratio": flower["peak_memory_mb"] / plain["peak_memory_mb"],
        "same_accuracy": flower["accuracy_matrix"] == plain["accuracy_matrix"],
        "scaling": [],
    }
    print(f"{'':24}{'Flower':>10}{'plain':>10}{'ratio':>8}")
    for key, unit in (("wall_s", "s"), ("startup_s", "s"), ("steady_round_s", "s"), ("peak_memory_mb", "MB")):
        print(f"{key:24}{flower[key]:>10.2f}{plain[key]:>10.2f}{flower[key] / plain[key]:>8.2f}  {unit}")
    print(f"same accuracy matrix in both: {report['same_accuracy']}")
    print(f"targets: wall ratio <= {TARGETS['wall_ratio']}: {'met' if report['wall_ratio'] <= TARGETS['wall_ratio'] else 'MISSED'}"
          f" ({report['wall_ratio']:.2f}); Flower start-up <= {TARGETS['flower_startup_s']} s: "
          f"{'met' if flower['startup_s'] <= TARGETS['flower_startup_s'] else 'MISSED'} ({flower['startup_s']:.1f} s)")

    counts = [int(c) for c in args.scaling.split(",") if c]
    if counts:
        print(f"\nscaling (one task, 3 rounds):\n{'clients':>8}{'s/round':>10}{'startup s':>11}{'peak MB':>10}")
    for count in counts:
        run = measure_flower([*BASE, "num_tasks=1", "rounds_per_task=3", f"num_clients={count}"], log_file)
        report["scaling"].append({"clients": count, **{k: v for k, v in run.items() if k != "accuracy_matrix"}})
        print(f"{count:>8}{run['steady_round_s']:>10.2f}{run['startup_s']:>11.1f}{run['peak_memory_mb']:>10.0f}")

    before = previous_result()
    path = RESULTS_DIR / f"overhead-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    if before:
        print(f"\nprevious run ({before['when']}): wall ratio {before['wall_ratio']:.2f}, Flower start-up "
              f"{before['flower']['startup_s']:.1f} s, steady {before['flower']['steady_round_s']:.2f} s/round")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
