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
from strategies.analytic import RIDGE_GRID, Analytic, feature_sums, ridge_head

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
    scale = 1e-9 * np.abs(expected).max()  # entries near 0 of an ill-conditioned solve: to 1e-9 of the head's largest
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=scale)
    # the same data with the clients and the tasks in another order: the same head
    shuffled = [list(reversed(clients_of_task)) for clients_of_task in reversed(data)]
    np.testing.assert_allclose(analytic_head_after(shuffled, ridge).numpy(), expected, rtol=1e-9, atol=scale)


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


@pytest.mark.parametrize(("overrides", "width", "raw"), [
    (["method.blocks=null", "method.projection_dim=0", "method.ridge=1e-3"], 64, 0),  # the micro ViT's 64 pooled features
    (["method.projection_dim=128"], 128, 2 * 64 * 4),  # the default: 4 blocks' standardised tokens, projected, GCV
], ids=["last-layer", "multi-layer"])
def test_analytic_learns_every_task_without_forgetting_and_sends_sums_only(tmp_path, overrides, width, raw):
    results = run("analytic", tmp_path, *overrides)
    matrix = results["accuracy_matrix"]
    assert matrix[0][0] > 20 + 20 and min(matrix[1]) > 10 + 15  # chance: 20%, then 10% over the 10 classes seen
    # a reply carries H^T H and H^T Y (at most float64 and square, at least float32 and packed) and a few hundred
    # bytes; with the standardiser, task 0 also the moments (2 x raw, float64), and every sums request carries its
    # shift and scale (2 x raw, float32) and no other tensor of the model
    for r in results["rounds"]:
        moments = 16 * raw if r["task"] == 0 else 0
        least, most = 4 * (width * (width + 1) // 2 + width * 10), 8 * (width * width + width * 10) + moments + 2000
        assert least <= r["bytes_up"] / 3 < most and 8 * raw <= r["bytes_down"] / 3 < 8 * raw + 2000
        assert r["ridge"] == 1e-3 if raw == 0 else r["ridge"] in RIDGE_GRID


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
    class per task ends where two tasks of five end (on the backbone's pooled features: the
    standardised block features take the first task's statistics, which depend on its classes)."""
    pooled = ("method.blocks=null", "method.projection_dim=0", "method.ridge=1e-3")
    one = run("analytic", tmp_path / "one", "num_tasks=10", "classes_per_task=1", *pooled)
    five = run("analytic", tmp_path / "five", *pooled)
    assert len(one["accuracy_matrix"]) == 10
    assert one["faa_weighted"] == pytest.approx(five["faa_weighted"], abs=0.5) and one["faa_weighted"] > 10 + 15
