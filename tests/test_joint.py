"""Joint training (upper bound): centralised, same model and adapter, same results files."""

from __future__ import annotations

import json

import pytest

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.joint import run_joint
from strategies import method_class


def test_joint_learns_every_task_and_writes_the_results_files(tmp_path):
    cfg = compose_config("config", ["method=joint", "num_tasks=2", "rounds_per_task=1", "local_epochs=3",
                                    f"output_dir={tmp_path}"])
    results = run_joint(cfg, log=lambda m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == "joint" and saved["faa"] == pytest.approx(results["faa"])
    assert saved["bytes_up"] == saved["bytes_down"] == 0 and len(saved["rounds"]) == 2
    # trained on all seen classes at once, it keeps the first task: far above chance (10%)
    assert min(saved["accuracy_matrix"][-1]) > 40
    assert (tmp_path / "accuracy_matrix.png").is_file()


def test_a_federated_server_refuses_the_centralised_method():
    with pytest.raises(ConfigError, match="method=joint trains centrally"):
        method_class(compose_config("config", ["method=joint"]).method.name)
