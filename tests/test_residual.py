"""ResWU / FedEx residual exactness (float64), its factored form, FFA-LoRA, and base consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client_app.local_round import run_local_round
from fedcil.config import compose_config
from fedcil.experiment import experiment_for
from fedcil.model import adapted_layers, model_for, set_base_deltas
from fedcil.protocol import ClientUpdate, TrainRequest, decode_request, encode_request, unpack_base
from fedcil.tasks import split_for
from strategies.ffa_lora import FFALoRA
from strategies.fedex_lora import FedExLoRA
from strategies.talora import FedTaLoRA
from strategies.residual import ResidualBase, residual_factors

LAYER, D_OUT, D_IN, RANK = "blocks.0.attn.qkv", 9, 6, 2


def state(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{LAYER}.lora_A": torch.as_tensor(rng.normal(size=(RANK, D_IN))),
        f"{LAYER}.lora_B": torch.as_tensor(rng.normal(size=(D_OUT, RANK))),
        "head.weight": torch.as_tensor(rng.normal(size=(4, D_IN))),
        "head.bias": torch.as_tensor(rng.normal(size=4)),
    }


@pytest.mark.parametrize("method", ["fedex_lora", "talora"])
@pytest.mark.parametrize("seed", range(4))
def test_reswu_makes_the_global_model_the_exact_average_of_the_clients(method, seed):
    """W0_new + s B̄ Ā == W0_old + s sum_k p_k B_k A_k, to 1e-9 relative, round after round."""
    rng = np.random.default_rng(seed)
    s = 2.0
    strategy = {"fedex_lora": FedExLoRA, "talora": FedTaLoRA}[method](state(rng), scaling=s, seed=0)
    strategy.start_task(0)
    for round_in_task in range(3):
        before = strategy.base_deltas().get(LAYER, torch.zeros(D_OUT, D_IN, dtype=torch.float64))
        counts = rng.integers(1, 50, size=4)
        updates = [ClientUpdate(k, state(rng), int(n), 0.0) for k, n in enumerate(counts)]
        strategy.aggregate_round(0, round_in_task, updates)
        p = counts / counts.sum()
        target = before.numpy() + s * sum(pk * (u.tensors[f"{LAYER}.lora_B"] @ u.tensors[f"{LAYER}.lora_A"]).numpy() for pk, u in zip(p, updates))
        got = strategy.base_deltas()[LAYER].numpy() + s * (strategy.state[f"{LAYER}.lora_B"] @ strategy.state[f"{LAYER}.lora_A"]).numpy()
        np.testing.assert_allclose(got, target, rtol=1e-9, atol=1e-12 * np.abs(target).max())


def test_without_reswu_talora_is_plain_factor_averaging():
    rng = np.random.default_rng(0)
    strategy = FedTaLoRA(state(rng), scaling=2.0, seed=0, use_residual=False)
    strategy.aggregate_round(0, 0, [ClientUpdate(k, state(rng), 3, 0.0) for k in range(3)])
    assert strategy.base_deltas() == {} and strategy.configure_round(0, 1).base == {}


def test_factored_residual_equals_the_dense_one_and_switches_form_when_smaller():
    rng = np.random.default_rng(1)
    residual, dense = ResidualBase(), np.zeros((D_OUT, D_IN))
    shapes = []
    for _ in range(3):
        Bs = [torch.as_tensor(rng.normal(size=(D_OUT, RANK))) for _ in range(2)]
        As = [torch.as_tensor(rng.normal(size=(RANK, D_IN))) for _ in range(2)]
        shares = [0.3, 0.7]
        U, V = residual_factors(Bs, As, shares, scaling=2.0)
        assert U.shape[1] == V.shape[0] == 3 * RANK  # (K + 1) r
        B_mean, A_mean = sum(p * B for p, B in zip(shares, Bs)), sum(p * A for p, A in zip(shares, As))
        explicit = 2.0 * (sum(p * (B @ A) for p, B, A in zip(shares, Bs, As)) - B_mean @ A_mean)
        np.testing.assert_allclose((U @ V).numpy(), explicit.numpy(), rtol=1e-12, atol=1e-12)
        residual.add(LAYER, U, V)
        dense += explicit.numpy()
        shapes.append(sorted(residual.message()))
        np.testing.assert_allclose(residual.deltas()[LAYER].numpy(), dense, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(unpack_base(residual.message())[LAYER].numpy(), dense, rtol=1e-12, atol=1e-12)
    # rank 6 on a 9 x 6 layer: 6 * 15 = 90 > 54 numbers, so dense from the first round here
    assert shapes[0] == [f"{LAYER}.delta"]
    wide = ResidualBase()
    wide.add("big", torch.ones(300, 2, dtype=torch.float64), torch.ones(2, 200, dtype=torch.float64))
    assert sorted(wide.message()) == ["big.U", "big.V"]


def test_ffa_lora_trains_only_b_and_its_merge_is_exact():
    rng = np.random.default_rng(2)
    strategy = FFALoRA(state(rng))
    A = strategy.state[f"{LAYER}.lora_A"].clone()
    plan = strategy.configure_round(0, 0)
    assert plan.train_groups == ("lora_B", "head")
    counts = [5, 1, 9]
    updates = [ClientUpdate(k, {key: v for key, v in state(rng).items() if "lora_A" not in key}, n, 0.0) for k, n in enumerate(counts)]
    strategy.aggregate_round(0, 0, updates)
    assert torch.equal(strategy.state[f"{LAYER}.lora_A"], A)
    p = np.array(counts) / sum(counts)
    exact = sum(pk * (u.tensors[f"{LAYER}.lora_B"] @ A).numpy() for pk, u in zip(p, updates))
    np.testing.assert_allclose((strategy.state[f"{LAYER}.lora_B"] @ A).numpy(), exact, rtol=1e-9)


def test_a_client_that_missed_rounds_gets_the_same_base(cfg):
    """Requests carry the whole residual: the client that skipped round 0 loads the same W0 + residual."""
    fedex = compose_config("config", ["method=fedex_lora"])
    data = experiment_for(fedex).data
    model = model_for(fedex, data.num_classes, data.in_chans, data.image_size)
    set_base_deltas(model, {})
    strategy = FedExLoRA.from_config(fedex, split_for(fedex, data.num_classes), model.initial_state)
    strategy.start_task(0)
    plan = strategy.configure_round(0, 0)
    request = TrainRequest(0, 0, plan.state, plan.train_groups, {}, plan.base)
    updates = [ClientUpdate(k, *run_local_round(fedex, request, k, fedex.num_clients)) for k in (0, 1)]  # 2..4 miss it
    strategy.aggregate_round(0, 0, updates)
    plan = strategy.configure_round(0, 1)
    request = decode_request(encode_request(plan, 0, 1))  # through the wire format
    residual = strategy.base_deltas()
    bases = []
    for client in (0, 3):
        run_local_round(fedex, request, client, fedex.num_clients)
        bases.append({name: layer.base_layer.weight.detach().clone() for name, layer in adapted_layers(model).items()})
    assert set(residual) == set(adapted_layers(model))
    for name in residual:
        w0 = model.original_weights[name]
        torch.testing.assert_close(bases[0][name], bases[1][name], rtol=0, atol=0)
        torch.testing.assert_close(bases[0][name].double(), w0.double() + residual[name], rtol=1e-5, atol=1e-6)
