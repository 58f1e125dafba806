"""fcil-report on hand-made results files: grouping, mean and std over seeds, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedcil.cli.report import main
from fedcil.report import build_report, flatten


def fake_results(method: str, beta: float, seed: int, faa: float) -> dict:
    matrix = [[90.0, None], [faa - 10, faa + 10]]
    return {
        "method": method, "faa": faa, "aia": (90 + faa) / 2, "forgetting": 100 - faa,
        "accuracy_matrix": matrix, "wall_seconds": 10.0 + seed,
        "rounds": [{"clients": 2, "bytes_up": 4000 * (seed + 1), "bytes_down": 8000}, {"clients": 4, "bytes_up": 4000, "bytes_down": 8000}],
        "config": {"method": {"name": method}, "partition": {"name": "dirichlet", "beta": beta}, "seed": seed,
                   "output_dir": f"/x/{method}/{beta}/{seed}", "lora": {"targets": ["qkv"]}},
    }


@pytest.fixture
def sweep(tmp_path):
    faas = {("fedavg_lora", 0.5): [40.0, 44.0, 48.0], ("fedavg_lora", 0.05): [20.0, 30.0], ("other", 0.5): [60.0]}
    for (method, beta), values in faas.items():
        for seed, faa in enumerate(values):
            run = tmp_path / f"{method}-{beta}-{seed}"
            run.mkdir()
            (run / "results.json").write_text(json.dumps(fake_results(method, beta, seed, faa)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "error.json").write_text(json.dumps({"error": "RuntimeError: boom", "config": None}))
    return tmp_path, faas


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}


def test_report_groups_by_method_and_varying_settings(sweep, tmp_path):
    root, faas = sweep
    text = build_report([root], tmp_path / "report")
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert [(r["method"], float(r["partition.beta"]), int(r["seeds"])) for r in rows] == [
        ("fedavg_lora", 0.05, 2), ("fedavg_lora", 0.5, 3), ("other", 0.5, 1)]
    for row in rows:
        values = faas[(row["method"], float(row["partition.beta"]))]
        assert float(row["faa_mean"]) == pytest.approx(np.mean(values))
        if len(values) > 1:
            assert float(row["faa_std"]) == pytest.approx(np.std(values, ddof=1))
            assert float(row["aia_mean"]) == pytest.approx(np.mean([(90 + v) / 2 for v in values]))
        else:
            assert row["faa_std"] == ""
    # bytes per client per round: mean over rounds of bytes / clients, in KB
    first = rows[1]
    expected_up = np.mean([np.mean([4000 * (s + 1) / 2, 4000 / 4]) for s in range(3)]) / 1000
    assert float(first["up_kb_mean"]) == pytest.approx(expected_up)
    assert float(first["down_kb_mean"]) == pytest.approx(np.mean([4, 2]))
    assert "44.00 ± 4.00" in text and "RuntimeError: boom" in text
    for name in ("report.md", "faa_vs_beta.png", "accuracy_per_task.png", "accuracy_matrices.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_report_cli_without_results_fails_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_paths_are_shortened_for_display_only(tmp_path):
    for seed, path in enumerate(["/root/.cache/fedcil/simclr-abc/backbone.safetensors", None]):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        data = fake_results("fedavg_lora", 0.5, 0, 50.0 + seed)
        data["config"]["model"] = {"pretrained_path": path}
        (run / "results.json").write_text(json.dumps(data))
    text = build_report([tmp_path], tmp_path / "report")
    assert "| simclr-abc/backbone.safetensors |" in text and "/root/.cache" not in text
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert "/root/.cache/fedcil/simclr-abc/backbone.safetensors" in [r["model.pretrained_path"] for r in rows]
