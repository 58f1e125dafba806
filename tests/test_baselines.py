"""The head-only floor and the analytic classifier: exactness against centralised ridge
regression, safe solves, and end-to-end runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcil.cli.inprocess import run_inprocess
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate
from fedcil.tasks import make_task_split
from strategies import build_strategy
from strategies.analytic import Analytic, feature_sums, ridge_head

WIDTH, CLASSES = 6, 6


def analytic_head_after(tasks: list[list[tuple[np.ndarray, np.ndarray]]], ridge: float) -> torch.Tensor:
    """The analytic strategy's head weight after every task, each a list of clients' (features, labels)."""
    strategy = Analytic({"head.weight": torch.zeros(CLASSES, WIDTH, dtype=torch.float64),
                         "head.bias": torch.zeros(CLASSES, dtype=torch.float64)}, ridge=ridge)
    for task, clients in enumerate(tasks):
        strategy.start_task(task)
        updates = [ClientUpdate(k, feature_sums(torch.as_tensor(h), torch.as_tensor(y), CLASSES), len(y), 0.0)
                   for k, (h, y) in enumerate(clients)]
        strategy.aggregate_round(task, 0, updates)
    return strategy.state["head.weight"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), clients=st.integers(1, 5), tasks=st.integers(1, 3), ridge=st.sampled_from([1e-6, 1e-2, 1.0]))
def test_analytic_equals_centralised_ridge_regression_whatever_the_partition_and_order(seed, clients, tasks, ridge):
    rng = np.random.default_rng(seed)
    classes_per_task = CLASSES // tasks
    data = []
    for task in range(tasks):
        n = int(rng.integers(5, 40))
        h = rng.normal(size=(n, WIDTH)) * rng.uniform(0.1, 10, WIDTH)
        y = rng.integers(task * classes_per_task, (task + 1) * classes_per_task, n)
        cuts = np.sort(rng.integers(0, n + 1, clients - 1))  # any partition, empty shares included
        data.append([(h[a:b], y[a:b]) for a, b in zip([0, *cuts], [*cuts, n])])
    got = analytic_head_after(data, ridge)
    H = np.concatenate([h for clients_of_task in data for h, _ in clients_of_task])
    Y = np.eye(CLASSES)[np.concatenate([y for clients_of_task in data for _, y in clients_of_task])]
    G = H.T @ H
    expected = np.linalg.solve(G + ridge * np.mean(np.diag(G)) * np.eye(WIDTH), H.T @ Y).T
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    # the same data with the clients and the tasks in another order: the same head
    shuffled = [list(reversed(clients_of_task)) for clients_of_task in reversed(data)]
    np.testing.assert_allclose(analytic_head_after(shuffled, ridge).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_an_empty_or_singular_gram_gives_a_finite_head():
    head = ridge_head(torch.zeros(WIDTH, WIDTH, dtype=torch.float64), torch.zeros(WIDTH, CLASSES, dtype=torch.float64), 1e-3)
    assert torch.equal(head["head.weight"], torch.zeros(CLASSES, WIDTH, dtype=torch.float64))
    x = torch.ones(4, WIDTH, dtype=torch.float64)  # rank one: singular without the ridge
    singular = ridge_head(x.T @ x, x.T @ torch.eye(CLASSES, dtype=torch.float64)[[0, 1, 0, 1]], 0.0)
    assert torch.isfinite(singular["head.weight"]).all()


def run(method: str, tmp_path, *extra: str) -> dict:
    cfg = compose_config("config", [
        f"method={method}", "num_clients=3", "num_tasks=2", "classes_per_task=5", "rounds_per_task=1",
        "local_epochs=2", "lr=0.01", "partition=iid", f"output_dir={tmp_path}", "checkpoint=false", *extra,
    ])
    return run_inprocess(cfg)


@pytest.mark.parametrize("projection", [0, 128])
def test_analytic_learns_every_task_without_forgetting_and_sends_sums_only(tmp_path, projection):
    results = run("analytic", tmp_path, f"method.projection_dim={projection}")
    matrix = results["accuracy_matrix"]
    assert matrix[0][0] > 20 + 20 and min(matrix[1]) > 10 + 15  # chance: 20%, then 10% over the 10 classes seen
    width = projection or 64  # the head sees the projection, or the micro ViT's 64 features
    # a request carries no tensor of the model; a reply carries H^T H and H^T Y (float64) and a few hundred bytes
    sums = 8 * (width * width + width * 10)
    assert all(sums <= r["bytes_up"] / 3 < sums + 1000 and r["bytes_down"] / 3 < 1000 for r in results["rounds"])


def test_head_only_exchanges_the_head_only_and_learns_each_task(tmp_path):
    results = run("head_only", tmp_path, "rounds_per_task=2", "local_epochs=5", "lr=0.05")
    head = 4 * (10 * 64 + 10)  # float32 head weight and bias
    assert all(head <= r["bytes_up"] / 3 < head + 1000 for r in results["rounds"])
    assert results["accuracy_matrix"][0][0] > 20 + 10 and results["accuracy_matrix"][1][1] > 10 + 5


@pytest.mark.parametrize("method", ["fedavg_lora", "lorm", "head_only"])
def test_one_class_per_task_is_refused_for_the_masked_loss(method):
    cfg = compose_config("config", [f"method={method}", "num_tasks=10", "classes_per_task=1"])
    with pytest.raises(ConfigError, match="classes_per_task=1: .*identically zero"):
        build_strategy(cfg, make_task_split(10, 10, 1, "natural", 0), {})


def test_one_class_per_task_is_fine_for_the_analytic_classifier(tmp_path):
    """Its final head is ridge regression on all the data, however the classes came: one
    class per task ends where two tasks of five end."""
    one = run("analytic", tmp_path / "one", "num_tasks=10", "classes_per_task=1")
    five = run("analytic", tmp_path / "five")
    assert len(one["accuracy_matrix"]) == 10
    assert one["faa_weighted"] == pytest.approx(five["faa_weighted"], abs=0.5) and one["faa_weighted"] > 10 + 15
