"""A real Hydra multirun of Flower simulations: results, a recorded failure, skip on re-run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcil.report import build_report

pytestmark = pytest.mark.e2e

SWEEP = Path(sys.executable).parent / "fcil-sweep"
TINY = ["num_tasks=2", "rounds_per_task=1", "num_clients=3", "local_epochs=1", "partition=dirichlet"]


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(SWEEP), "-m", *args, *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_multirun_records_failures_reports_and_skips_done_jobs(tmp_path):
    # beta=-1 is invalid: that job is refused before its Flower run starts; the others go on.
    first = sweep(tmp_path, "partition.beta=0.5,1.0,-1.0")
    assert first.returncode == 1, first.stderr[-2000:]
    results = sorted((tmp_path / "sweep").rglob("results.json"))
    errors = sorted((tmp_path / "sweep").rglob("error.json"))
    assert len(results) == 2 and len(errors) == 1
    error = json.loads(errors[0].read_text())
    assert "partition.beta=-1.0 is out of range" in error["error"] and error["config"]["partition"]["beta"] == -1.0
    assert all((r.parent / ".hydra" / "config.yaml").is_file() for r in results)

    build_report([tmp_path / "sweep"], tmp_path / "report")
    rows = {float(r["partition.beta"]): r for r in csv.DictReader(open(tmp_path / "report" / "report.csv"))}
    for path in results:
        data = json.loads(path.read_text())
        row = rows[data["config"]["partition"]["beta"]]
        assert row["seeds"] == "1" and float(row["faa_mean"]) == pytest.approx(data["faa"])
        assert float(row["aia_mean"]) == pytest.approx(data["aia"])
        assert float(row["wall_seconds_mean"]) == pytest.approx(data["wall_seconds"])
    assert "partition.beta=-1.0 is out of range" in (tmp_path / "report" / "report.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in results}
    again = sweep(tmp_path, "partition.beta=0.5,1.0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipping") == 2
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
