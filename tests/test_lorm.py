"""LoRM against independent formulations, in float64: least squares on stacked inputs,
explicit X^T X, plain averaging, and the cross-task formula written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcil.closed_form import merge_with_grams, regularise_gram
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.gram import GramRecorder, compute_grams
from fedcil.model import adapted_layers, build_model, get_trainable_state
from fedcil.protocol import GRAM_ADAPTER_SCALE, ClientUpdate, unpack_base
from fedcil.tasks import make_task_split
from strategies import build_strategy
from strategies.lorm import LoRM, LoRMSettings, client_summaries, factor_of_round

D_IN, D_OUT, RANK, FEAT, CLASSES = 7, 5, 2, 6, 4
LAYER = "blocks.0.attn.qkv"
SCALING = 2.0


def lorm(seed: int = 0, **settings) -> LoRM:
    """LoRM on 2 tasks of 2 classes, built without Hydra, with a negligible ridge."""
    split = make_task_split(CLASSES, 2, None, "natural", seed=0)
    return LoRM(initial_state(seed), split, SCALING, seed=0, settings=LoRMSettings(**{"ridge": 1e-12, **settings}))


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{LAYER}.lora_A": torch.randn(RANK, D_IN, generator=g, dtype=torch.float64),
        f"{LAYER}.lora_B": torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64),
        "head.weight": torch.randn(CLASSES, FEAT, generator=g, dtype=torch.float64),
        "head.bias": torch.randn(CLASSES, generator=g, dtype=torch.float64),
    }


def make_client(rng: np.random.Generator, state: dict, factor: str, rows: int) -> tuple[dict, dict]:
    """A client's trained state (its ``factor`` and head rows perturbed) and its inputs."""
    trained = {k: v.clone() for k, v in state.items()}
    trained[f"{LAYER}.{factor}"] = torch.as_tensor(rng.normal(size=tuple(state[f"{LAYER}.{factor}"].shape)))
    trained["head.weight"][:2] = torch.as_tensor(rng.normal(size=(2, FEAT)))
    trained["head.bias"][:2] = torch.as_tensor(rng.normal(size=2))
    inputs = {"layer": rng.normal(size=(rows, D_IN)) * rng.uniform(0.5, 2, D_IN), "head": rng.normal(size=(rows // 2, FEAT))}
    return trained, inputs


def gram_of(x: np.ndarray, alpha: float) -> torch.Tensor:
    return regularise_gram(torch.as_tensor(x.T @ x), alpha)


def run_round(factor: str, clients: int, seed: int, alpha: float, head_alpha: float = 1.0):
    """One LoRM round over random clients; the strategy and the clients' data."""
    rng = np.random.default_rng(seed)
    strategy = lorm(seed)
    round_in_task = 0 if factor == "lora_B" else 1
    plan = strategy.configure_round(0, round_in_task)
    assert plan.train_groups == (factor, "head") and plan.extra == {"statistics": "lorm"}
    updates, data = [], []
    for k in range(clients):
        trained, inputs = make_client(rng, plan.state, factor, rows=int(rng.integers(10, 40)))
        grams = {LAYER: gram_of(inputs["layer"], alpha), "head": gram_of(inputs["head"], head_alpha)}
        n = len(inputs["head"])
        summaries = client_summaries(trained, grams, factor, range(0, 2), n)
        updates.append(ClientUpdate(k, summaries, n, 0.0))
        data.append((trained, inputs))
    before = {k: v.clone() for k, v in strategy.state.items()}
    strategy.aggregate_round(0, round_in_task, updates)
    return strategy, before, data


def lstsq_factor(before: dict, data: list, factor: str) -> np.ndarray:
    """argmin over the factor of sum_k ||X_k dW^T - X_k dW_k^T||^2 by least squares on stacked rows."""
    A, B = before[f"{LAYER}.lora_A"].numpy(), before[f"{LAYER}.lora_B"].numpy()
    X = np.concatenate([inputs["layer"] for _, inputs in data])
    if factor == "lora_B":  # X A^T B^T = Y, unknown B^T
        Y = np.concatenate([i["layer"] @ (t[f"{LAYER}.lora_B"].numpy() @ A).T for t, i in data])
        return np.linalg.lstsq(X @ A.T, Y, rcond=None)[0].T
    # X A^T B^T = Y with B fixed: vec(X M B^T) = (B kron X) vec(M), M = A^T (column-major vec)
    Y = np.concatenate([i["layer"] @ (B @ t[f"{LAYER}.lora_A"].numpy()).T for t, i in data])
    M = np.linalg.lstsq(np.kron(B, X), Y.flatten(order="F"), rcond=None)[0].reshape(D_IN, RANK, order="F")
    return M.T


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_is_the_least_squares_minimiser_of_the_response_error(factor, seed):
    strategy, before, data = run_round(factor, clients=4, seed=seed, alpha=1.0)
    expected = lstsq_factor(before, data, factor)
    np.testing.assert_allclose(strategy.state[f"{LAYER}.{factor}"].numpy(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_head_rows_are_regmean_and_the_bias_is_sample_weighted(seed):
    strategy, before, data = run_round("lora_B", clients=3, seed=seed, alpha=0.0)
    F = np.concatenate([i["head"] for _, i in data])
    Y = np.concatenate([i["head"] @ t["head.weight"][:2].numpy().T for t, i in data])
    np.testing.assert_allclose(strategy.state["head.weight"][:2].numpy(), np.linalg.lstsq(F, Y, rcond=None)[0].T, rtol=1e-6)
    counts = np.array([len(i["head"]) for _, i in data])
    biases = np.stack([t["head.bias"][:2].numpy() for t, _ in data])
    np.testing.assert_allclose(strategy.state["head.bias"][:2].numpy(), counts @ biases / counts.sum(), rtol=1e-6)
    assert torch.equal(strategy.state["head.weight"][2:], before["head.weight"][2:].to(strategy.state["head.weight"].dtype))


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_identical_clients_merge_to_that_client(factor, alpha):
    rng = np.random.default_rng(3)
    strategy = lorm(3)
    trained, inputs = make_client(rng, strategy.state, factor, rows=30)
    grams = {LAYER: gram_of(inputs["layer"], alpha), "head": gram_of(inputs["head"], 0.5)}
    update = client_summaries(trained, grams, factor, range(0, 2), 15)
    strategy.aggregate_round(0, 0 if factor == "lora_B" else 1, [ClientUpdate(k, update, 15, 0.0) for k in range(3)])
    for key in (f"{LAYER}.{factor}", "head.weight", "head.bias"):
        np.testing.assert_allclose(strategy.state[key].numpy(), trained[key].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_full_gram_merge_never_has_more_response_error_than_averaging(seed):
    for factor in ("lora_A", "lora_B"):
        strategy, before, data = run_round(factor, clients=5, seed=seed, alpha=1.0)
        A, B = before[f"{LAYER}.lora_A"], before[f"{LAYER}.lora_B"]
        total = sum(i["head"].shape[0] for _, i in data)
        average = sum(len(i["head"]) / total * t[f"{LAYER}.{factor}"] for t, i in data)

        def error(candidate: torch.Tensor) -> float:
            merged = candidate @ A if factor == "lora_B" else B @ candidate
            return sum(
                float(np.linalg.norm(i["layer"] @ (merged - t[f"{LAYER}.lora_B"] @ t[f"{LAYER}.lora_A"]).numpy().T) ** 2)
                for t, i in data
            )

        assert error(strategy.state[f"{LAYER}.{factor}"].double()) <= error(average) * (1 + 1e-9)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_diagonal_path_equals_the_full_path_fed_diagonal_grams(factor):
    results = []
    for as_matrix in (False, True):
        rng = np.random.default_rng(11)
        strategy = lorm(11)
        updates = []
        for k in range(3):
            trained, inputs = make_client(rng, strategy.state, factor, rows=20)
            diagonal = gram_of(inputs["layer"], 0.0)
            assert diagonal.dim() == 1
            grams = {LAYER: torch.diag(diagonal) if as_matrix else diagonal, "head": gram_of(inputs["head"], 0.5)}
            updates.append(ClientUpdate(k, client_summaries(trained, grams, factor, range(0, 2), 10), 10, 0.0))
        strategy.aggregate_round(0, 0 if factor == "lora_B" else 1, updates)
        results.append(strategy.state[f"{LAYER}.{factor}"])
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_cross_task_merge_equals_its_formula():
    """W = W0 + (sum_t dW_t G_t)(sum_t G_t)^-1 with dW_t = s B_t A_t, on hand-made tensors."""
    strategy = lorm(5, gram_alpha=1.0)
    rng = np.random.default_rng(5)
    deltas, grams = [], []
    for task in range(2):
        strategy.start_task(task)
        strategy.state[f"{LAYER}.lora_A"] = torch.as_tensor(rng.normal(size=(RANK, D_IN)))
        strategy.state[f"{LAYER}.lora_B"] = torch.as_tensor(rng.normal(size=(D_OUT, RANK)))
        client_grams = [torch.as_tensor((x := rng.normal(size=(12, D_IN))).T @ x) for _ in range(3)]
        strategy.end_task(task, [ClientUpdate(k, {f"{LAYER}.G": g}, 12, 0.0) for k, g in enumerate(client_grams)])
        deltas.append(SCALING * strategy.state[f"{LAYER}.lora_B"].numpy() @ strategy.state[f"{LAYER}.lora_A"].numpy())
        grams.append(sum(g.numpy() for g in client_grams))
    expected = sum(d @ g for d, g in zip(deltas, grams)) @ np.linalg.inv(sum(grams))
    np.testing.assert_allclose(strategy.base_deltas()[LAYER].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not strategy.evaluation_state()[f"{LAYER}.lora_B"].any()  # the adapter lives in the merged base


def test_running_average_grams_see_the_plain_average_of_the_task_adapters():
    """Task t's requests (per round and at its end) carry the Gram model W0 + s (sum_{u<t} B_u A_u + B_t A_t) / (t + 1)
    as factors of the finished tasks' own adapters and the trained adapter's weight 1 / (t + 1); ``own`` sends none."""
    strategy, own = lorm(3, gram_model="running_average"), lorm(3)
    rng = np.random.default_rng(3)
    deltas = []
    for task in range(3):
        for each in (strategy, own):
            each.start_task(task)
        plans = [strategy.configure_round(task, 0), strategy.configure_round(task, 1), strategy.task_end_plan(task)]
        for plan in plans:
            assert plan.extra.get(GRAM_ADAPTER_SCALE, 1.0) == pytest.approx(1 / (task + 1))
            got = unpack_base(plan.gram_base).get(LAYER, torch.zeros(D_OUT, D_IN, dtype=torch.float64))
            np.testing.assert_allclose(got.numpy(), sum(deltas, np.zeros((D_OUT, D_IN))) / (task + 1), rtol=1e-12, atol=1e-12)
        assert all(not p.gram_base and GRAM_ADAPTER_SCALE not in p.extra
                   for p in (own.configure_round(task, 0), own.task_end_plan(task)))
        strategy.state[f"{LAYER}.lora_A"] = torch.as_tensor(rng.normal(size=(RANK, D_IN)))
        strategy.state[f"{LAYER}.lora_B"] = torch.as_tensor(rng.normal(size=(D_OUT, RANK)))
        deltas.append(SCALING * strategy.state[f"{LAYER}.lora_B"].numpy() @ strategy.state[f"{LAYER}.lora_A"].numpy())
        for each in (strategy, own):
            each.end_task(task, [ClientUpdate(0, {f"{LAYER}.G": torch.rand(D_IN, dtype=torch.float64) + 0.1}, 5, 0.0)])
    restored = lorm(3, gram_model="running_average")
    restored.restore(*strategy.checkpoint())
    assert all(torch.equal(a, b) for a, b in zip(restored.gram_model()[0].values(), strategy.gram_model()[0].values()))


def test_a_task_alone_merges_to_its_own_adapter():
    strategy = lorm(2)
    strategy.start_task(0)
    strategy.state[f"{LAYER}.lora_B"] = torch.randn(D_OUT, RANK, dtype=torch.float64)
    strategy.end_task(0, [ClientUpdate(0, {f"{LAYER}.G": torch.rand(D_IN) + 0.1}, 5, 0.0)])
    expected = SCALING * strategy.state[f"{LAYER}.lora_B"] @ strategy.state[f"{LAYER}.lora_A"]
    torch.testing.assert_close(strategy.base_deltas()[LAYER].double(), expected, rtol=1e-5, atol=1e-6)


def test_each_task_starts_a_fresh_seeded_adapter_and_rounds_alternate_b_first():
    strategy = lorm(1)
    strategy.start_task(0)
    first = strategy.state[f"{LAYER}.lora_A"].clone()
    assert not strategy.state[f"{LAYER}.lora_B"].any()
    assert float(first.abs().max()) <= 1 / np.sqrt(D_IN) + 1e-6  # kaiming-uniform(a=sqrt 5) bound
    strategy.state[f"{LAYER}.lora_B"] += 1
    strategy.start_task(1)
    assert not strategy.state[f"{LAYER}.lora_B"].any() and not torch.equal(first, strategy.state[f"{LAYER}.lora_A"])
    again = lorm(1)
    again.start_task(0)
    assert torch.equal(first, again.state[f"{LAYER}.lora_A"])
    assert [factor_of_round("alt", r) for r in range(5)] == ["lora_B", "lora_A", "lora_B", "lora_A", "lora_B"]
    assert {factor_of_round("A", r) for r in range(3)} == {"lora_A"}
    with pytest.raises(ConfigError, match="train_matrix 'C'; valid choices: A, B, alt"):
        build_strategy(compose_config("config", ["method=lorm", "method.train_matrix=C"]), make_task_split(CLASSES, 2, None, "natural", 0), initial_state())


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_hook_gram_equals_explicit_x_transpose_x(alpha):
    """Token inputs (batch, tokens, d) are flattened to rows; the diagonal path stores a vector."""
    layer = torch.nn.Linear(D_IN, 3)
    batches = [torch.randn(4, 9, D_IN) for _ in range(3)]
    recorder = GramRecorder({"layer": layer}, {"layer": alpha})
    for batch in batches:
        layer(batch)
    recorder.close()
    X = torch.cat([b.reshape(-1, D_IN) for b in batches]).double().numpy()
    G = X.T @ X
    expected = np.diag(G) if alpha == 0 else alpha * G + (1 - alpha) * np.diag(np.diag(G))
    np.testing.assert_allclose(recorder.grams()["layer"].numpy(), expected, rtol=1e-10)
    layer(batches[0])  # hooks are gone
    assert len(recorder.sums) == 1


def test_model_grams_cover_every_adapted_layer_over_every_token(cfg):
    model = build_model(cfg.model, cfg.lora, 10, 1, 8, seed=0)
    images = torch.rand(6, 1, 8, 8)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long))
    layers = adapted_layers(model)
    inputs: dict[str, list] = {}
    handles = [m.register_forward_hook(lambda _m, i, _o, n=n: inputs.setdefault(n, []).append(i[0])) for n, m in layers.items()]
    grams = compute_grams(model, layers, {n: 1.0 for n in layers}, dataset, np.arange(6), 4, torch.device("cpu"))
    for handle in handles:
        handle.remove()
    assert set(grams) == set(layers) == {k.removesuffix(".lora_A") for k in get_trainable_state(model) if k.endswith("lora_A")}
    for name, gram in grams.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]]).double()
        assert X.shape[0] == 6 * (1 + 16)  # class token + 4x4 patches per image
        torch.testing.assert_close(gram, X.T @ X)


def test_dense_and_diagonal_solves_agree_with_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6))
    N = rng.normal(size=(3, 6))
    G = X.T @ X
    np.testing.assert_allclose(merge_with_grams(torch.as_tensor(N), torch.as_tensor(G), 0.0).numpy(), N @ np.linalg.inv(G), rtol=1e-8)
    g = np.diag(G).copy()
    g[2] = 0.0  # an input that never fires: its column of N = sum A_k Ĝ_k is zero too
    N[:, 2] = 0.0
    for ridge in (0.0, 1e-9):
        merged = merge_with_grams(torch.as_tensor(N), torch.as_tensor(g), ridge).numpy()
        assert np.all(merged[:, 2] == 0) and np.allclose(merged[:, [0, 1, 3]], N[:, [0, 1, 3]] / g[[0, 1, 3]], rtol=1e-6)


def test_lorm_reports_where_its_accuracy_goes(tmp_path):
    """The diagnostics score the final model with the task id given, and each task's own
    adapter instead of the cross-task merge: a given task id can only help, and the merged
    model's class-incremental accuracies are the accuracy matrix's last row."""
    from fedcil.cli.inprocess import run_inprocess

    cfg = compose_config("config", [
        "method=lorm", "num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=2", "partition=iid",
        "eval_every_round=false", "checkpoint=false", f"output_dir={tmp_path}",
    ])
    results = run_inprocess(cfg)
    diagnostics = results["diagnostics"]
    assert set(diagnostics) == {"merged", "own_adapter"}
    assert diagnostics["merged"]["accuracy"] == results["accuracy_matrix"][-1]
    for scores in diagnostics.values():
        assert len(scores["accuracy"]) == 2
        assert all(aware >= plain for aware, plain in zip(scores["task_aware_accuracy"], scores["accuracy"]))
    assert diagnostics["own_adapter"]["accuracy"] != diagnostics["merged"]["accuracy"]
