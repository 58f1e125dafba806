"""The FCIL benchmark in one command: every method and variant (:data:`METHODS`) on
Fashion-MNIST under the LoRM authors' protocol, three partitions, three seeds; LoRM and
FedAvg-LoRA under the short protocol for comparison; the methods that train nothing on all
the data (:data:`ALL_DATA`); then the reports.

    .venv/bin/python -m bench.fcil_benchmark                   # every job: hours on 2 cores
    .venv/bin/python -m bench.fcil_benchmark --only faithful/lorm alldata/   # some of them
    .venv/bin/python -m bench.fcil_benchmark --seeds 0 --train-per-class 100   # a quick look
    .venv/bin/python -m bench.fcil_benchmark --out bench/results/claimed \
        --set replies.weighting=claimed replies.update_factor=null              # other settings

Every job is one ``fcil-run ... backend=inprocess`` (its own process, the shipped SimCLR
backbone), ``--jobs`` of them side by side; a job whose ``results.json`` exists is skipped,
so an interrupted benchmark goes on where it stopped. ``--set`` adds overrides to every
job (give each setting its own ``--out``). Images are capped per class
(``--train-per-class``, ``--test-per-class``) to fit the time on a CPU, except in ``alldata/``.
Writes, under ``--out``: one folder per job, ``faithful/``, ``short/`` and ``alldata/`` reports
(``report.md``, ``report.csv``, plots) and ``benchmark.md`` with their tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from fedcil.cli.run import APP_DIR
from fedcil.report import build_report

PARTITIONS = {
    "dirichlet0.05": ["partition=dirichlet", "partition.beta=0.05"],
    "dirichlet0.5": ["partition=dirichlet", "partition.beta=0.5"],
    "quantity2": ["partition=quantity", "partition.alpha=2"],
}
ANALYTIC = ["method=analytic", "rounds_per_task=1"]  # no training: one round per task
METHODS = {  # job name prefix -> overrides; variants change one setting of their method
    "lorm": ["method=lorm"],  # under protocol=lorm: Grams under the running average of the task adapters
    "lorm_own_grams": ["method=lorm", "method.gram_model=own"],
    "lorm_gram_alpha0.5": ["method=lorm", "method.gram_alpha=0.5"],
    "fedavg_lora": ["method=fedavg_lora"], "ffa_lora": ["method=ffa_lora"], "fedex_lora": ["method=fedex_lora"],
    "talora": ["method=talora"], "head_only": ["method=head_only"],
    "analytic": ANALYTIC,  # 4 blocks, projection 2000, GCV ridge
    "analytic_last_layer": [*ANALYTIC, "method.blocks=null", "method.projection_dim=0", "method.ridge=0.001"],
}
ALL_DATA = {  # methods that train nothing, on every image (no caps): their cost is one pass over the data
    "analytic": ANALYTIC,
    "analytic_p5000": [*ANALYTIC, "method.projection_dim=5000"],
    "analytic_last_layer": METHODS["analytic_last_layer"],
}
JOINT_PARTITION = "dirichlet0.05"  # joint training pools every client's data: the partition does not apply
SHORT_METHODS = ("lorm", "fedavg_lora")


def jobs(seeds: list[int], caps: list[str], common: list[str], only: list[str] | None = None) -> dict[str, list[str]]:
    """Job name -> ``fcil-run`` overrides: every job gets ``common``, all but ``alldata/`` the image ``caps``
    (with ``only``, the jobs whose name starts with one of those prefixes)."""
    planned = {}
    for seed in seeds:
        for part, part_overrides in PARTITIONS.items():
            for name, method in METHODS.items():
                overrides = ["experiment=fmnist_lorm", *method, *part_overrides]
                planned[f"faithful/{name}_{part}_s{seed}"] = [*overrides, *caps, *common, f"seed={seed}"]
        for name, method in ALL_DATA.items():
            overrides = ["experiment=fmnist_lorm", *method, *PARTITIONS[JOINT_PARTITION]]
            planned[f"alldata/{name}_s{seed}"] = [*overrides, *common, f"seed={seed}"]
        joint = ["experiment=fmnist_lorm", "method=joint", *PARTITIONS[JOINT_PARTITION], *caps, *common, f"seed={seed}"]
        planned[f"faithful/joint_{JOINT_PARTITION}_s{seed}"] = joint
        for method in SHORT_METHODS:
            overrides = ["experiment=fmnist_ssl", f"method={method}", *PARTITIONS["dirichlet0.5"]]
            planned[f"short/{method}_dirichlet0.5_s{seed}"] = [*overrides, *caps, *common, f"seed={seed}"]
    return {name: o for name, o in planned.items() if only is None or name.startswith(tuple(only))}


def run_job(out: Path, overrides: list[str]) -> tuple[bool, float]:
    """One ``fcil-run`` in-process run into ``out``: (succeeded, seconds); its log goes to ``out/run.log``."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "fcil-run"), *overrides, "backend=inprocess", f"output_dir={out}"]
    with open(out / "run.log", "w") as log:
        done = subprocess.run(command, cwd=APP_DIR, stdout=log, stderr=subprocess.STDOUT).returncode == 0
    return done, time.monotonic() - started


def diagnostics_table(out: Path) -> str:
    """Where LoRM's accuracy goes, per partition (mean over seeds of the per-task means):
    the merged model without and with the task id, each task's own adapter without and
    with it, and joint training's FAA (one run per seed: it pools the data, whatever the partition)."""
    rows = ["| partition | LoRM FAA | merged, task id given | own adapters | own adapters, task id given | joint FAA |",
            "|---|---|---|---|---|---|"]
    for part in PARTITIONS:
        lorm = [json.loads(f.read_text()) for f in sorted((out / "faithful").glob(f"lorm_{part}_s*/results.json"))]
        joint = [json.loads(f.read_text())["faa"] for f in sorted((out / "faithful").glob("joint_*/results.json"))]
        if not lorm:
            continue
        cells = [statistics.mean(r["faa"] for r in lorm)] + [
            statistics.mean(statistics.mean(r["diagnostics"][model][key]) for r in lorm)
            for model, key in (("merged", "task_aware_accuracy"), ("own_adapter", "accuracy"), ("own_adapter", "task_aware_accuracy"))
        ] + [statistics.mean(joint) if joint else float("nan")]
        rows.append(f"| {part} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=APP_DIR / "bench" / "results" / "fcil")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (each uses one torch thread)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every job")
    parser.add_argument("--only", nargs="+", metavar="PREFIX",
                        help="run only the jobs whose name starts with one of these (e.g. faithful/lorm short/)")
    args = parser.parse_args(argv)
    caps = [f"train_per_class={args.train_per_class}", f"test_per_class={args.test_per_class}"]
    common = ["eval_every_round=false", *args.set]
    out = args.out.resolve()
    planned = jobs(args.seeds, caps, common, args.only)
    todo = {name: o for name, o in planned.items() if not (out / name / "results.json").is_file()}
    print(f"fcil-benchmark: {len(todo)} jobs to run ({len(planned) - len(todo)} done) in {out}", flush=True)
    started, finished, failed = time.monotonic(), 0, []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_job, out / name, overrides): name for name, overrides in todo.items()}
        for future in as_completed(futures):
            done, seconds = future.result()
            finished += 1
            failed += [] if done else [futures[future]]
            eta = (time.monotonic() - started) / finished * (len(todo) - finished)
            print(f"fcil-benchmark: [{finished}/{len(todo)}] {futures[future]} "
                  f"{'done' if done else 'FAILED'} in {seconds:.0f}s  ETA {eta / 60:.0f} min", flush=True)
    tables = [f"# FCIL benchmark\n\nSettings: {' '.join(caps + common)} (alldata/: no caps); seeds {args.seeds}.\n"]
    for protocol in ("faithful", "short", "alldata"):
        if (out / protocol).is_dir():
            tables.append(f"## {protocol}\n\n{build_report([out / protocol], out / protocol)}")
    tables.append(f"## Where LoRM's accuracy goes (faithful protocol)\n\n{diagnostics_table(out)}")
    (out / "benchmark.md").write_text("\n".join(tables))
    print(f"fcil-benchmark: reports in {out}/benchmark.md; {time.monotonic() - started:.0f}s", flush=True)
    if failed:
        print(f"fcil-benchmark: failed jobs (see run.log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
