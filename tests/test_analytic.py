"""The multi-layer analytic classifier: the federated standardiser, GCV from sums, the block features,
and the settings, each against an independent formulation (numpy on the pooled data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.model import build_model
from fedcil.protocol import ClientUpdate, RoundPlan
from fedcil.settings import check_settings
from server_app.influence import InfluenceBounds, bound_influence, summed_tensors
from strategies.analytic import MOMENTS, RIDGE_GRID, STANDARDISER, Analytic, feature_moments, feature_sums, gcv_scores

RAW, CLASSES = 5, 6


def standardising(projection: np.ndarray | None, ridge: float | str) -> Analytic:
    """An analytic strategy with a standardiser over ``RAW`` features and a head as wide as the projection."""
    width = RAW if projection is None else projection.shape[0]
    return Analytic({"head.weight": torch.zeros(CLASSES, width, dtype=torch.float64),
                     "head.bias": torch.zeros(CLASSES, dtype=torch.float64),
                     STANDARDISER[0]: torch.zeros(RAW, dtype=torch.float64),
                     STANDARDISER[1]: torch.ones(RAW, dtype=torch.float64)}, ridge=ridge)


def client_reply(plan: RoundPlan, h: np.ndarray, y: np.ndarray, projection: np.ndarray | None) -> ClientUpdate:
    """What a client holding raw features ``h`` sends: the moments, or the sums of what the head sees
    under the sent standardiser (as :meth:`fedcil.model.FCILModel.head_inputs` computes it)."""
    features = torch.as_tensor(h)
    if plan.extra["statistics"] == MOMENTS:
        return ClientUpdate(0, feature_moments(features), len(y), 0.0)
    z = (features - plan.state[STANDARDISER[0]]) * plan.state[STANDARDISER[1]]
    if projection is not None:
        z = torch.relu(z @ torch.as_tensor(projection).T)
    return ClientUpdate(0, feature_sums(z, torch.as_tensor(y), CLASSES), len(y), 0.0)


def federated(tasks: list[list[tuple[np.ndarray, np.ndarray]]], projection: np.ndarray | None, ridge: float | str) -> Analytic:
    """The strategy after every task, driven as the server loop drives it (one round per task)."""
    strategy = standardising(projection, ridge)
    for task, clients in enumerate(tasks):
        strategy.start_task(task)
        plan = strategy.configure_round(task, 0)
        strategy.aggregate_round(task, 0, [client_reply(plan, h, y, projection) for h, y in clients])
        end = strategy.task_end_plan(task)
        strategy.end_task(task, [client_reply(end, h, y, projection) for h, y in clients] if end else [])
    return strategy


def centralised(tasks: list[list[tuple[np.ndarray, np.ndarray]]], projection: np.ndarray | None, ridge: float | str):
    """numpy on the pooled data: the first task's mean and standard deviation, the head's inputs, the ridge
    chosen by GCV from the explicit hat matrix, and ``W = (Z^T Z + eps I)^-1 Z^T Y``."""
    first = np.concatenate([h for h, _ in tasks[0]])
    mean, std = first.mean(axis=0), first.std(axis=0)
    H = np.concatenate([h for clients in tasks for h, _ in clients])
    Y = np.eye(CLASSES)[np.concatenate([y for clients in tasks for _, y in clients])]
    Z = (H - mean) / std
    if projection is not None:
        Z = np.maximum(Z @ projection.T, 0)
    G, n = Z.T @ Z, len(Z)

    def solve(r: float) -> np.ndarray:
        return np.linalg.solve(G + r * np.mean(np.diag(G)) * np.eye(len(G)), Z.T @ Y)

    def gcv(r: float) -> float:
        hat = Z @ np.linalg.solve(G + r * np.mean(np.diag(G)) * np.eye(len(G)), Z.T)
        spare = n - np.trace(hat)
        return np.sum((Y - hat @ Y) ** 2) / spare**2 if spare > 0 else np.inf

    chosen = min(RIDGE_GRID, key=gcv) if ridge == "gcv" else ridge
    return chosen, solve(chosen).T, (mean, 1 / std)


def random_tasks(rng: np.random.Generator, tasks: int, clients: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Features of very different scales and offsets per task, split into ``clients`` shares (empty ones included)."""
    per_task = CLASSES // tasks
    data = []
    for task in range(tasks):
        n = int(rng.integers(8, 40))
        h = rng.normal(size=(n, RAW)) * rng.uniform(0.1, 100, RAW) + rng.uniform(-50, 50, RAW)
        y = rng.integers(task * per_task, (task + 1) * per_task, n)
        cuts = np.sort(rng.integers(0, n + 1, clients - 1))
        data.append([(h[a:b], y[a:b]) for a, b in zip([0, *cuts], [*cuts, n])])
    return data


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), clients=st.integers(1, 4), tasks=st.integers(2, 3),
       projection=st.sampled_from([0, 3, 12]), ridge=st.sampled_from([1e-6, 1e-2, "gcv"]))
def test_standardised_projected_head_equals_centralised_ridge_whatever_the_partition_and_order(seed, clients, tasks, projection, ridge):
    """Standardised (first task's statistics, from sums) and projected features, fixed or GCV ridge: the federated
    head is numpy's centralised ridge on the pooled features; the client order does not matter, and another task
    order gives the centralised head under that order's first task."""
    rng = np.random.default_rng(seed)
    data = random_tasks(rng, tasks, clients)
    R = rng.normal(size=(projection, RAW)) if projection else None
    for order in (data, [list(reversed(c)) for c in data], list(reversed(data))):
        strategy = federated(order, R, ridge)
        chosen, weight, (shift, scale) = centralised(order, R, ridge)
        np.testing.assert_allclose(strategy.state[STANDARDISER[0]].numpy(), shift, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(strategy.state[STANDARDISER[1]].numpy(), scale, rtol=1e-9)
        assert strategy.record() == {"ridge": chosen}
        np.testing.assert_allclose(strategy.state["head.weight"].numpy(), weight, rtol=1e-9, atol=1e-9 * np.abs(weight).max())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30), width=st.integers(1, 12))
def test_gcv_scores_from_sums_equal_the_explicit_hat_matrix_formula(seed, n, width):
    """``RSS / (n - trace(hat))^2`` from ``G``, ``C`` and ``n`` equals the score from residuals, per ridge (n < d too)."""
    rng = np.random.default_rng(seed)
    Z, Y = rng.normal(size=(n, width)), np.eye(3)[rng.integers(0, 3, n)]
    G = Z.T @ Z
    eigenvalues, vectors = np.linalg.eigh(G)
    energies = ((vectors.T @ Z.T @ Y) ** 2).sum(axis=1)
    for eps in (1e-3, 0.1, 10.0):
        hat = Z @ np.linalg.solve(G + eps * np.eye(width), Z.T)
        expected = np.sum((Y - hat @ Y) ** 2) / (n - np.trace(hat)) ** 2
        got = gcv_scores(torch.as_tensor(eigenvalues).clamp_min(0), torch.as_tensor(energies), float(n), [eps])[0]
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_every_exchange_declares_what_it_sums_and_a_moment_reply_without_examples_is_dropped():
    """The moments and the sums are sums of ``n_k``-weighted statistics: each declared (so the zero-claim check and the
    weighting cover them); a reply claiming no examples with non-zero moments cannot steer the standardiser."""
    strategy = standardising(None, 1e-3)
    plans = [strategy.configure_round(0, 0), strategy.task_end_plan(0), strategy.configure_round(1, 0)]
    assert [p.extra["statistics"] for p in plans] == [MOMENTS, "analytic", "analytic"] and strategy.task_end_plan(1) is None
    for plan in plans:
        assert summed_tensors(strategy.weighted_sums(plan)) == sorted(strategy.expected_reply(plan, 0))
    honest = [ClientUpdate(k, feature_moments(torch.randn(20, RAW, dtype=torch.float64)), 20, 0.0) for k in range(3)]
    liar = ClientUpdate(3, {"S": torch.full((RAW,), 1e6), "Q": torch.full((RAW,), 1e12)}, 0, 0.0)
    bounded = bound_influence([*honest, liar], strategy.weighted_sums(plans[0]), InfluenceBounds())
    assert list(bounded.dropped) == [3] and "num-examples=0" in bounded.dropped[3]


def micro(*overrides: str):
    return compose_config("config", ["method=analytic", *overrides])


def test_block_features_are_the_cls_and_mean_patch_tokens_the_backbone_pools():
    """The last block's CLS token, through the backbone's final norm, is the backbone's own pooled feature; the mean
    patch token is the mean of its patch tokens; the standardiser is built as the identity."""
    cfg = micro("method.projection_dim=16")
    model = build_model(cfg.model, cfg.lora, 10, 1, 8, seed=0, feature_blocks=[1, 3])
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    width = model.backbone.num_features
    backbone = model.backbone
    with torch.no_grad():
        blocks = model.block_features(images)
        tokens = backbone.blocks(backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(model.prepare(images)))))
        torch.testing.assert_close(backbone.norm(tokens), backbone.forward_features(model.prepare(images)))  # timm's path
        assert blocks.shape == (4, 2 * width * 2)
        last_cls, last_mean = blocks[:, 2 * width:3 * width], blocks[:, 3 * width:]
        torch.testing.assert_close(last_cls, tokens[:, 0])
        torch.testing.assert_close(last_mean, tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(backbone.norm(last_cls), model.features(images))
        torch.testing.assert_close(model.head_inputs(images), torch.relu(blocks @ model.projection.T))


@pytest.mark.parametrize(("override", "message"), [
    ("method.ridge=loo", "method.ridge='loo' is out of range; allowed: gcv or a number >= 0"),
    ("method.ridge=-1", "method.ridge=-1 is out of range; allowed: gcv or a number >= 0"),
    ("method.blocks=[]", r"method.blocks=\[\] is not valid; allowed: null .* distinct block indices >= 0"),
    ("method.blocks=[1,1]", r"method.blocks=\[1, 1\] is not valid"),
    ("method.blocks=[a]", r"method.blocks=\['a'\] is not valid"),
])
def test_bad_analytic_settings_are_refused_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(micro(override))


def test_blocks_beyond_the_backbones_depth_are_refused_naming_the_valid_ones():
    cfg = micro()
    with pytest.raises(ConfigError, match=r"method.blocks=\[0, 4\] .* valid choices: \[0, 1, 2, 3\]"):
        build_model(cfg.model, cfg.lora, 10, 1, 8, seed=0, feature_blocks=[0, 4])


def test_gcv_is_refused_for_lorm_whose_ridge_is_a_number():
    with pytest.raises(ConfigError, match="method.ridge='gcv' is out of range; allowed: a number >= 0"):
        check_settings(compose_config("config", ["method=lorm", "method.ridge=gcv"]))
