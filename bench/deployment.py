"""Seconds per round in a real deployment, a Flower simulation and in-process, side by side.

    .venv/bin/python -m bench.deployment                      # digits, 3 clients, 2 tasks x 2 rounds
    .venv/bin/python -m bench.deployment --overrides "num_tasks=2 rounds_per_task=3"

The same small job runs four times:

1. **deployment**: ``scripts/deploy_local.sh -n 3``, a SuperLink with TLS and three
   SuperNodes as separate processes, each message answered through the node's warm worker;
2. **deployment, cold**: the same with ``-x warm-worker=false``: every message pays a fresh
   ClientApp process with its imports, data loading and model building (what a Flower
   ClientApp costs without the worker);
3. **simulation**: ``fcil-run`` (local SuperLink, Ray actors);
4. **in-process**: ``backend=inprocess`` (no Flower runtime).

For each: wall time of the whole command, start-up (time before the first round plus the
first round's excess over a steady round), steady seconds per round (median after the
first), and the ratio of each to in-process. Every run must give the same accuracy
matrix. Results go to ``bench/results/deployment-<time>.json``; the previous file's figures
are printed next to the new ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path

from bench.overhead import steady
from fedcil.cli.run import APP_DIR, FlowerSite, launch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_DEPLOYMENT_ROUND_S = 6.0
NODES = 3


def timings(results: dict, started_epoch: float, wall: float) -> dict:
    """Wall, start-up and steady s/round of one run from its ``results.json``."""
    rounds = [r["seconds"] for r in results["rounds"]]
    before_first = results["started_at"] + results["setup_seconds"] - started_epoch
    return {
        "wall_s": wall, "startup_s": before_first + rounds[0] - steady(rounds), "steady_round_s": steady(rounds),
        "round_s": rounds, "accuracy_matrix": results["accuracy_matrix"],
    }


def run_deployment(overrides: list[str], work: Path, node_config: str, log: Path) -> dict:
    """``scripts/deploy_local.sh`` with ``NODES`` SuperNodes; its timings."""
    extra = ["-x", node_config] if node_config else []
    started, epoch = time.monotonic(), time.time()
    with open(log, "a") as out:
        done = subprocess.run(["bash", str(APP_DIR / "scripts" / "deploy_local.sh"), "-n", str(NODES), "-w", str(work),
                               *extra, *overrides], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"deploy_local.sh failed (exit {done.returncode}); see {log}")
    return timings(json.loads((work / "results" / "results.json").read_text()), epoch, time.monotonic() - started)


def run_launch(overrides: list[str], out: Path, log: Path, site: FlowerSite | None = None) -> dict:
    """``fcil-run``'s launcher (a simulation, or in-process); its timings."""
    started, epoch = time.monotonic(), time.time()
    with open(log, "a") as stream, redirect_stdout(stream):
        launch("config", [*overrides, f"output_dir={out}"], site=site)
    return timings(json.loads((out / "results.json").read_text()), epoch, time.monotonic() - started)


def previous_result() -> dict | None:
    """The most recent earlier result file of this benchmark, if any."""
    files = sorted(RESULTS_DIR.glob("deployment-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", default="num_tasks=2 rounds_per_task=2", help="extra config overrides")
    parser.add_argument("--skip-cold", action="store_true", help="leave out the deployment without warm workers")
    args = parser.parse_args(argv)
    overrides = [f"num_clients={NODES}", *args.overrides.split()]
    RESULTS_DIR.mkdir(exist_ok=True)
    log = RESULTS_DIR / "deployment-last-run.log"
    log.write_text("")
    print(f"deployment benchmark: {' '.join(overrides)} (logs: {log})", flush=True)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fcil-bench-") as tmp:
        root = Path(tmp)
        runs["deployment"] = run_deployment(overrides, root / "deploy", "", log)
        print(f"  deployment done ({runs['deployment']['wall_s']:.0f} s)", flush=True)
        if not args.skip_cold:
            runs["deployment_cold"] = run_deployment(overrides, root / "cold", "warm-worker=false", log)
            print(f"  cold deployment done ({runs['deployment_cold']['wall_s']:.0f} s)", flush=True)
        runs["simulation"] = run_launch(overrides, root / "sim", log, FlowerSite.isolated(root / "flwr-home"))
        print(f"  simulation done ({runs['simulation']['wall_s']:.0f} s)", flush=True)
        runs["inprocess"] = run_launch([*overrides, "backend=inprocess"], root / "inproc", log)

    base = runs["inprocess"]
    before = previous_result()
    print(f"\n{'':22}{'wall s':>9}{'start-up s':>12}{'s/round':>9}{'x in-process':>14}   rounds (s)")
    for name, run in runs.items():
        ratio = run["steady_round_s"] / base["steady_round_s"]
        rounds = " ".join(f"{s:.1f}" for s in run["round_s"])
        print(f"{name:22}{run['wall_s']:>9.1f}{run['startup_s']:>12.1f}{run['steady_round_s']:>9.2f}{ratio:>14.2f}   {rounds}")
        if before and name in before["runs"]:
            old = before["runs"][name]
            print(f"{'  previous run':22}{old['wall_s']:>9.1f}{old['startup_s']:>12.1f}{old['steady_round_s']:>9.2f}")
    same = all(run["accuracy_matrix"] == base["accuracy_matrix"] for run in runs.values())
    met = runs["deployment"]["steady_round_s"] <= TARGET_DEPLOYMENT_ROUND_S
    print(f"same accuracy matrix in every run: {same}")
    print(f"target: deployment <= {TARGET_DEPLOYMENT_ROUND_S:g} s per round: {'met' if met else 'MISSED'}"
          f" ({runs['deployment']['steady_round_s']:.2f} s)")
    report = {"when": datetime.now().isoformat(timespec="seconds"), "overrides": overrides, "runs": runs,
              "same_accuracy": same, "previous": before["when"] if before else None}
    path = RESULTS_DIR / f"deployment-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path}" + (f" (previous: {before['when']})" if before else ""))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
