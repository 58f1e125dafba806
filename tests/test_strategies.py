"""FedAvg-LoRA aggregation (against numpy) and the message protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedcil.errors import ConfigError
from fedcil.protocol import GRAM_ADAPTER_SCALE, ClientUpdate, RoundPlan, decode_reply, decode_request, encode_reply, encode_request
from strategies import METHODS
from strategies.fedavg_lora import FedAvgLoRA


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.qkv.lora_A": torch.randn(4, 16, generator=g),
        "blocks.0.attn.qkv.lora_B": torch.randn(48, 4, generator=g),
        "head.weight": torch.randn(10, 16, generator=g),
        "head.bias": torch.randn(10, generator=g),
    }


def test_fedavg_lora_is_the_sample_weighted_mean_of_each_tensor():
    strategy = FedAvgLoRA(random_state(0))
    plan = strategy.configure_round(task=0, round_in_task=0)
    assert set(plan.train_groups) == {"lora_A", "lora_B", "head"} and set(plan.state) == set(random_state(0))
    counts = [3, 10, 1]
    updates = [ClientUpdate(node_id=k, tensors=random_state(k + 1), num_examples=n, loss=0.0) for k, n in enumerate(counts)]
    strategy.aggregate_round(0, 0, updates)
    for key in random_state(0):
        stacked = np.stack([u.tensors[key].numpy().astype(np.float64) for u in updates])
        expected = np.tensordot(np.array(counts) / sum(counts), stacked, axes=1)
        np.testing.assert_allclose(strategy.state[key].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_fedavg_of_identical_clients_is_that_client():
    strategy = FedAvgLoRA(random_state(0))
    same = random_state(7)
    strategy.aggregate_round(0, 0, [ClientUpdate(k, same, n, 0.0) for k, n in enumerate([1, 5, 9])])
    assert all(torch.allclose(strategy.state[k], same[k]) for k in same)


def test_unknown_method_lists_the_registered_ones(cfg):
    with pytest.raises(ConfigError, match="valid choices: .*fedavg_lora"):
        METHODS.get("fedprox")


def test_request_and_reply_survive_serialisation():
    state = random_state(3)
    gram_base = {"blocks.0.attn.qkv.U": torch.rand(6, 2), "blocks.0.attn.qkv.V": torch.rand(2, 5)}
    plan = RoundPlan(state=state, train_groups=("lora_B", "head"), extra={"alpha": 0.5, GRAM_ADAPTER_SCALE: 0.25},
                     gram_base=gram_base)
    decoded = decode_request(recorddict_from_proto(recorddict_to_proto(encode_request(plan, 2, 4))))
    assert (decoded.task, decoded.round_in_task, decoded.train_groups) == (2, 4, ("lora_B", "head"))
    assert decoded.extra == {"alpha": 0.5, GRAM_ADAPTER_SCALE: 0.25} and decoded.gram_adapter_scale == 0.25
    assert all(torch.equal(decoded.state[k], v) for k, v in state.items())
    assert decoded.base == {} and all(torch.equal(decoded.gram_base[k], v) for k, v in gram_base.items())
    reply = encode_reply(state, num_examples=42, loss=0.25)
    size = recorddict_to_proto(reply).ByteSize()
    assert size >= 4 * sum(v.numel() for v in state.values())
    update = decode_reply(9, recorddict_from_proto(recorddict_to_proto(reply)))
    assert (update.node_id, update.num_examples, update.loss) == (9, 42, 0.25)
