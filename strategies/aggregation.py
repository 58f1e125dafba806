"""Pure aggregation helpers on tensors (no Flower, no strategy state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedcil.protocol import ClientUpdate, TensorDict


def sample_shares(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("no training examples in the round's replies")
    return [u.num_examples / total for u in updates]


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in float64 and returned in the inputs' dtype."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        acc += weight * tensor.to(torch.float64)
    return acc.to(tensors[0].dtype)


def average_updates(updates: Sequence[ClientUpdate], keys: Sequence[str]) -> TensorDict:
    """Sample-weighted average of each named tensor over the clients' replies."""
    shares = sample_shares(updates)
    return {key: weighted_average([u.tensors[key] for u in updates], shares) for key in keys}


def sum_updates(updates: Sequence[ClientUpdate], keys: Sequence[str]) -> TensorDict:
    """Element-wise float64 sum of each named tensor over the clients' replies.

    Each term is cast into one reused buffer and added in place: no per-client temporaries,
    which matters for dense Grams of wide layers.
    """
    sums = {}
    for key in keys:
        total = updates[0].tensors[key].to(torch.float64, copy=True)
        buffer = torch.empty_like(total)
        for update in updates[1:]:
            total.add_(buffer.copy_(update.tensors[key]))
        sums[key] = total
    return sums


def fresh_adapter(state: TensorDict, seed: int, task: int) -> TensorDict:
    """``state`` with every adapter re-initialised as PEFT does: B = 0, A kaiming-uniform.

    Seeded by (seed, task), so every run and every process draws the same adapter.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + task)
    fresh = dict(state)
    for key in sorted(state):
        if key.endswith(".lora_A"):
            fresh[key] = torch.nn.init.kaiming_uniform_(torch.empty_like(state[key]), a=math.sqrt(5), generator=generator)
        elif key.endswith(".lora_B"):
            fresh[key] = torch.zeros_like(state[key])
    return fresh
