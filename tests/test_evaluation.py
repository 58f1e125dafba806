"""Evaluation on the clients' own test shards equals evaluation on the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcil.config import compose_config
from fedcil.data import load_dataset
from fedcil.errors import ConfigError
from fedcil.experiment import experiment_for
from fedcil.shapes import declared_shape
from fedcil.cli.run import launch

RUN = ["num_tasks=3", "classes_per_task=3", "rounds_per_task=2", "num_clients=3", "local_epochs=2", "backend=inprocess"]


def results(tmp_path, name: str, overrides: list[str]) -> dict:
    return json.loads((launch("config", [*overrides, f"output_dir={tmp_path / name}"]) / "results.json").read_text())


@pytest.mark.parametrize("method", ["fedavg_lora", "talora", "lorm"])
def test_client_evaluation_equals_server_evaluation(tmp_path, method):
    server = results(tmp_path, "server", [*RUN, f"method={method}"])
    clients = results(tmp_path, "clients", [*RUN, f"method={method}", "evaluation=clients", "eval_every_round=true"])
    assert set(clients) == set(server)
    assert clients["accuracy_matrix"] == server["accuracy_matrix"]
    assert [r["accuracy"] for r in clients["rounds"]] == [r["accuracy"] for r in server["rounds"]]
    # evaluating on clients costs messages; on the server it costs none
    assert all(c["bytes_down"] > s["bytes_down"] for c, s in zip(clients["rounds"], server["rounds"]))


def test_by_default_clients_evaluate_only_after_each_task(tmp_path):
    """``eval_every_round=auto``: the server evaluates every round, the clients only after a task's last round."""
    server = results(tmp_path, "server", RUN)
    clients = results(tmp_path, "clients", [*RUN, "evaluation=clients"])
    assert clients["accuracy_matrix"] == server["accuracy_matrix"]
    assert all(r["accuracy"] is not None for r in server["rounds"])
    for c, s in zip(clients["rounds"], server["rounds"]):
        last = c["round"] == 1
        assert (c["accuracy"] == s["accuracy"]) if last else c["accuracy"] is None
        assert (c["bytes_down"] > s["bytes_down"]) if last else c["bytes_down"] == s["bytes_down"]


def test_test_shards_split_the_test_set_without_overlap(cfg):
    experiment = experiment_for(cfg)
    shards = [experiment.test_shard(k, 4) for k in range(4)]
    together = np.concatenate(shards)
    assert len(together) == len(np.unique(together)) == len(experiment.test_labels)


def test_declared_shapes_match_the_data_and_folders_need_num_classes():
    names = ["digits"] + (["fashion_mnist"] if Path("/usr/share/datasets/fashion-mnist").is_dir() else [])
    for name in names:
        dataset = compose_config("config", [f"dataset={name}"]).dataset
        data = load_dataset(dataset)
        assert declared_shape(dataset).__dict__ == {
            "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}
    with pytest.raises(ConfigError, match="dataset.num_classes is null for dataset=imagenet_r"):
        declared_shape(compose_config("config", ["dataset=imagenet_r"]).dataset)
    assert declared_shape(compose_config("config", ["dataset=imagenet_r", "dataset.num_classes=200"]).dataset).num_classes == 200


def test_unknown_evaluation_fails_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown evaluation 'nodes'; valid choices: clients, server"):
        launch("config", [*RUN, "evaluation=nodes", f"output_dir={tmp_path / 'x'}"])
