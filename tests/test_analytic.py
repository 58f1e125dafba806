"""The multi-layer analytic classifier: the federated standardiser, GCV from sums, the ridge chosen on the
clients' hold-outs, the block features, and the settings, each against an independent formulation (numpy on the
pooled data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client_app.local_round import run_local_round
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.experiment import experiment_for
from fedcil.model import build_model, model_for, set_sent_state
from fedcil.protocol import ClientUpdate, RoundPlan, TrainRequest
from fedcil.settings import check_settings
from server_app.influence import InfluenceBounds, bound_influence, summed_tensors
from server_app.validation import InvalidReply, ReplyLimits, checked
from strategies.analytic import (
    CORRECT, MOMENTS, RIDGE_GRID, SCORES, STANDARDISER, VALIDATION_GRID, Analytic, feature_moments, feature_sums,
    gcv_scores, holdout_mask, holdout_size,
)
from strategies.base import ClientRound

RAW, CLASSES = 5, 6


def standardising(projection: np.ndarray | None, ridge: float | str, holdout: float = 0.1, seed: int = 0) -> Analytic:
    """An analytic strategy with a standardiser over ``RAW`` features and a head as wide as the projection."""
    width = RAW if projection is None else projection.shape[0]
    return Analytic({"head.weight": torch.zeros(CLASSES, width, dtype=torch.float64),
                     "head.bias": torch.zeros(CLASSES, dtype=torch.float64),
                     STANDARDISER[0]: torch.zeros(RAW, dtype=torch.float64),
                     STANDARDISER[1]: torch.ones(RAW, dtype=torch.float64)}, ridge=ridge, holdout=holdout, seed=seed)


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


def no_input_grams(*_):
    raise AssertionError("the analytic client asks for no input Grams")


def head_inputs(state: dict, h: np.ndarray, projection: np.ndarray | None) -> torch.Tensor:
    """What the head sees of raw features ``h`` under the sent standardiser (as the model computes it)."""
    z = (torch.as_tensor(h) - state[STANDARDISER[0]]) * state[STANDARDISER[1]]
    return z if projection is None else torch.relu(z @ torch.as_tensor(projection).T)


def answering(plan: RoundPlan, task: int, seen: int, h: np.ndarray, y: np.ndarray, projection: np.ndarray | None,
              node: int = 0) -> ClientUpdate:
    """The reply of a client holding raw features ``h`` (labels ``y``) of ``task``, from :meth:`Analytic.client_reply`."""
    width = RAW if projection is None else projection.shape[0]

    def features(raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(h) if raw else head_inputs(plan.state, h, projection)), torch.as_tensor(y)

    client = ClientRound(TrainRequest(task, 0, plan.state, (), plan.extra), {"head.weight": torch.zeros(CLASSES, width)},
                         len(y), range(seen - 2, seen), no_input_grams, features)
    return ClientUpdate(node, Analytic.client_reply({}, client), len(y), 0.0)


def validated(tasks: list[list[tuple[np.ndarray, np.ndarray]]], projection: np.ndarray | None, holdout: float,
              seed: int) -> tuple[Analytic, list[dict]]:
    """The strategy after every task with ``method.ridge=validation``, and its record after each task."""
    strategy, records = standardising(projection, "validation", holdout, seed), []
    per_task = CLASSES // len(tasks)
    for task, clients in enumerate(tasks):
        seen = (task + 1) * per_task
        strategy.start_task(task)
        plan = strategy.configure_round(task, 0)
        strategy.aggregate_round(task, 0, [answering(plan, task, seen, h, y, projection, k) for k, (h, y) in enumerate(clients)])
        end = strategy.task_end_plan(task)
        strategy.end_task(task, [answering(end, task, seen, h, y, projection, k) for k, (h, y) in enumerate(clients)])
        records.append(strategy.record())
    return strategy, records


def centralised_validation(tasks: list[list[tuple[np.ndarray, np.ndarray]]], projection: np.ndarray | None,
                           holdout: float, seed: int) -> tuple[float, list[int], np.ndarray]:
    """numpy on the pooled data of the last task: the candidate heads solved on every earlier task's data plus the
    last task's images outside the hold-outs, their right predictions (among the seen classes) on the hold-outs, the
    ridge with the most (ties: the larger), and the head solved at that ridge on ALL the data."""
    first = np.concatenate([h for h, _ in tasks[0]])
    mean, std = first.mean(axis=0), first.std(axis=0)

    def inputs(h: np.ndarray) -> np.ndarray:
        z = (h - mean) / std
        return z if projection is None else np.maximum(z @ projection.T, 0)

    def solve(Z: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
        G = Z.T @ Z
        return np.linalg.solve(G + ridge * np.mean(np.diag(G)) * np.eye(len(G)), Z.T @ np.eye(CLASSES)[y])

    last = len(tasks) - 1
    earlier = [(inputs(h), y) for clients in tasks[:last] for h, y in clients]
    held = [holdout_mask(torch.as_tensor(y), holdout, seed, last).numpy() for _, y in tasks[last]]
    fit = earlier + [(inputs(h)[~m], y[~m]) for (h, y), m in zip(tasks[last], held)]
    hold = [(inputs(h)[m], y[m]) for (h, y), m in zip(tasks[last], held)]
    Zf, yf = np.concatenate([z for z, _ in fit]), np.concatenate([y for _, y in fit])
    Zh, yh = np.concatenate([z for z, _ in hold]), np.concatenate([y for _, y in hold])
    seen = len(tasks) * (CLASSES // len(tasks))
    correct = [int(((Zh @ solve(Zf, yf, r))[:, :seen].argmax(axis=1) == yh).sum()) for r in VALIDATION_GRID]
    chosen = max(zip(correct, VALIDATION_GRID))[1]
    Z = np.concatenate([inputs(h) for clients in tasks for h, _ in clients])
    y = np.concatenate([y for clients in tasks for _, y in clients])
    return chosen, correct, solve(Z, y, chosen).T


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), clients=st.integers(1, 4), tasks=st.integers(2, 3), projection=st.sampled_from([0, 12]),
       holdout=st.sampled_from([0.1, 0.3]))
def test_validation_picks_the_ridge_with_most_right_holdout_predictions_and_solves_on_all_data(seed, clients, tasks, projection, holdout):
    """``method.ridge=validation``: the clients' hold-out counts are numpy's on the pooled hold-outs for heads solved
    without them, the chosen ridge is the one with the most (ties: the larger), and the head is centralised ridge on ALL
    the training data (fit and hold-out) at that ridge, to 1e-9; task 0, whose sums follow the moments, keeps GCV.
    The choice and its counts survive a checkpoint."""
    rng = np.random.default_rng(seed)
    data = random_tasks(rng, tasks, clients)
    R = rng.normal(size=(projection, RAW)) if projection else None
    strategy, records = validated(data, R, holdout, seed)
    chosen, correct, weight = centralised_validation(data, R, holdout, seed)
    assert records[0]["holdout_correct"] is None and records[0]["ridge"] in RIDGE_GRID  # GCV's
    assert records[-1] == {"ridge": chosen, "holdout_correct": correct}
    np.testing.assert_allclose(strategy.state["head.weight"].numpy(), weight, rtol=1e-9, atol=1e-9 * np.abs(weight).max())
    restored = standardising(R, "validation", holdout, seed)
    restored.restore(*strategy.checkpoint())
    assert restored.record() == records[-1]
    assert torch.equal(restored.state["head.weight"], strategy.state["head.weight"])


def test_holdouts_are_a_seeded_fraction_of_each_clients_images_the_same_in_every_exchange():
    """``floor(fraction x n)`` images, at least one from two on, none below; the same draw for the same seed, task and
    labels (the sums round and the scoring round agree), another for another seed or task."""
    labels = torch.arange(40) % 3
    for n in range(0, 40):
        mask = holdout_mask(labels[:n], 0.1, 7, 2)
        assert int(mask.sum()) == holdout_size(n, 0.1) == (0 if n < 2 else max(1, n // 10))
        assert torch.equal(mask, holdout_mask(labels[:n].clone(), 0.1, 7, 2))
    draws = {tuple(holdout_mask(labels, 0.25, seed, task).nonzero().flatten().tolist()) for seed in (0, 1) for task in (0, 1)}
    assert len(draws) == 4


def scoring_round(n_honest: int = 4) -> tuple[Analytic, RoundPlan, list[ClientUpdate]]:
    """A validating strategy after task 1's sums round of ``n_honest`` clients with 40 images each, its scoring request,
    and the clients' honest replies: 4 hold-out images each, all four right under the fourth candidate, two under the others."""
    rng = np.random.default_rng(0)
    strategy = standardising(None, "validation")
    for task in (0, 1):
        data = [(rng.normal(size=(40, RAW)), rng.integers(2 * task, 2 * task + 2, 40)) for _ in range(n_honest)]
        strategy.start_task(task)
        plan = strategy.configure_round(task, 0)
        strategy.aggregate_round(task, 0, [answering(plan, task, 2 * task + 2, h, y, None, k) for k, (h, y) in enumerate(data)])
        end = strategy.task_end_plan(task)
        if task == 0:
            strategy.end_task(task, [answering(end, task, 2, h, y, None, k) for k, (h, y) in enumerate(data)])
    honest = torch.full((len(VALIDATION_GRID),), 2.0)
    honest[3] = 4.0
    return strategy, end, [ClientUpdate(k, {CORRECT: honest.clone()}, 40, 0.0) for k in range(n_honest)]


def screened(strategy: Analytic, plan: RoundPlan, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict]:
    """The replies the server's checks let through to the strategy: validation, then the influence bounds."""
    limits, valid, dropped = ReplyLimits(10_000_000, 1e13), [], {}
    for update in updates:
        try:
            valid.append(checked(update, strategy.expected_reply(plan, 1), limits))
        except InvalidReply as exc:
            dropped[update.node_id] = str(exc)
    bounded = bound_influence(valid, strategy.weighted_sums(plan), InfluenceBounds())
    return bounded.updates, dropped | bounded.dropped


@pytest.mark.parametrize("poison", [
    [1e12, -1e12, -1e12, -1e12, -1e12, -1e12, -1e12, 1e12],  # huge for two bad candidates, negative for the rest
    [40.0, 0, 0, -40.0, 0, 0, 0, 40.0],
    [float("nan")] * 3 + [-1.0] + [float("inf")] * 4,
])
def test_a_client_lying_about_its_holdout_counts_moves_them_by_at_most_its_holdout(poison):
    """Poison counts (huge, negative, NaN, infinite) from a client claiming as many images as the others: the server
    does not crash, non-finite replies are dropped, and the liar's counts reach the choice only within 0..its hold-out
    size (4): the honest clients' choice (the fourth ridge, 16 right against 8) stands, on the server's path and when
    the strategy gets the poison directly."""
    strategy, plan, honest = scoring_round()
    assert plan.extra["statistics"] == SCORES
    liar = ClientUpdate(9, {CORRECT: torch.tensor(poison, dtype=torch.float64)}, 40, 0.0)
    kept, dropped = screened(strategy, plan, [*honest, liar])
    assert (9 in dropped) == any(not np.isfinite(c) for c in poison)
    for updates in (kept, [*honest, liar]):
        strategy.end_task(1, updates)
        totals = torch.tensor(strategy.record()["holdout_correct"])
        liars_part = totals - 4 * torch.where(torch.arange(len(VALIDATION_GRID)) == 3, 4.0, 2.0)
        assert bool((liars_part >= 0).all() and (liars_part <= 4).all())
        assert strategy.record()["ridge"] == VALIDATION_GRID[3]


def test_a_client_inflating_its_claim_votes_at_most_the_holdout_of_the_claim_the_weighting_leaves_it():
    """A liar claiming 10^6 images (within ``replies.max_examples``) and 10^6 right predictions for the largest ridge:
    the default weighting cuts its claim to the others' 160 images and its counts with it; the strategy then bounds
    them by the hold-out of 160 images (16), so it weighs no more than all honest clients together."""
    strategy, plan, honest = scoring_round()
    liar = ClientUpdate(9, {CORRECT: torch.tensor([0.0] * 7 + [1e6], dtype=torch.float64)}, 1_000_000, 0.0)
    kept, dropped = screened(strategy, plan, [*honest, liar])
    assert not dropped and next(u for u in kept if u.node_id == 9).num_examples == 160
    strategy.end_task(1, kept)
    assert strategy.record()["holdout_correct"][-1] == 4 * 2 + holdout_size(160, 0.1) == 24


def test_a_secure_sum_of_counts_is_bounded_by_what_its_clients_can_hold_out():
    """Under secure aggregation the strategy sees one sum of ``clients`` replies: its counts are bounded by
    ``floor(0.1 x n) + clients``, at least the sum of every client's hold-out whatever the split of ``n``."""
    strategy, _, _ = scoring_round()
    for sizes in ([1, 1, 1], [2, 2, 2], [2, 19, 40], [0, 5, 9, 9]):
        total = ClientUpdate(0, {CORRECT: torch.full((len(VALIDATION_GRID),), 1e9)}, sum(sizes), 0.0, clients=len(sizes))
        bound = strategy.holdout_bound(total)
        assert sum(holdout_size(n, 0.1) for n in sizes) <= bound <= sum(sizes)
        assert bool((strategy.bounded_correct(total) == bound).all())


def test_the_holdout_is_among_the_clients_training_images_never_the_test_set():
    """A real client of the quickstart data answers the scoring request with the counts of the candidate heads on
    its own held-out training images (recomputed here from the training set alone), and its sums are those of its
    training images: the ridge is chosen from training-side data only."""
    cfg = micro("method.ridge=validation", "method.projection_dim=16")
    experiment = experiment_for(cfg)
    model = model_for(cfg, experiment.data.num_classes, experiment.data.in_chans, experiment.data.image_size)
    strategy = Analytic.from_config(cfg, experiment.split, model.initial_state)
    strategy.start_task(1)
    plan = strategy.configure_round(1, 0)
    reply = run_local_round(cfg, TrainRequest(1, 0, plan.state, (), plan.extra), 2, cfg.num_clients)
    strategy.aggregate_round(1, 0, [ClientUpdate(2, *reply)])
    end = strategy.task_end_plan(1)
    scores, n, _ = run_local_round(cfg, TrainRequest(1, 0, end.state, (), end.extra), 2, cfg.num_clients)
    indices = experiment.client_indices(1, 2)
    images = torch.stack([torch.as_tensor(experiment.data.train[i][0]) for i in indices])
    labels = experiment.label_map[torch.as_tensor([int(experiment.data.train[i][1]) for i in indices])]
    set_sent_state(model, end.state)
    with torch.no_grad():
        z = model.head_inputs(images).to(torch.float64)
    held = holdout_mask(labels, cfg.method.holdout, cfg.seed, 1)
    heads = torch.tensor(end.extra["candidates"], dtype=torch.float64).reshape(len(VALIDATION_GRID), *model.head.weight.shape)
    expected = [int(((z[held] @ w[:4].T).argmax(dim=1) == labels[held]).sum()) for w in heads]
    assert n == len(indices) and int(held.sum()) == holdout_size(n, cfg.method.holdout) > 0
    assert scores[CORRECT].tolist() == expected
    torch.testing.assert_close(reply[0]["G"], z.T @ z)
    torch.testing.assert_close(reply[0]["fit.G"], z[~held].T @ z[~held])


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
    ("method.ridge=foo", "method.ridge='foo' is out of range; allowed: gcv, validation or a number >= 0"),
    ("method.ridge=-1", "method.ridge=-1 is out of range; allowed: gcv, validation or a number >= 0"),
    ("method.holdout=0", "method.holdout=0 is out of range; allowed: a number > 0 and < 1"),
    ("method.holdout=1", "method.holdout=1 is out of range; allowed: a number > 0 and < 1"),
    ("method.holdout=foo", "method.holdout='foo' is out of range; allowed: a number > 0 and < 1"),
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
