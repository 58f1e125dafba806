"""Ways a client reply can be wrong, each applied to an honest reply's records."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

ATTACKS = ("wrong_shape", "nan", "huge_norm", "negative_count", "missing_key", "integer_dtype")


def corrupt(content: RecordDict, attack: str) -> RecordDict:
    """A copy of the reply ``content`` with one defect, ``attack`` (one of :data:`ATTACKS`)."""
    tensors = content.array_records["update"].to_torch_state_dict()
    metrics = dict(content.metric_records["metrics"])
    first = sorted(tensors)[0]
    if attack == "wrong_shape":
        tensors[first] = torch.cat([tensors[first].reshape(-1), torch.zeros(1)])
    elif attack == "nan":
        tensors[first] = tensors[first].clone().reshape(-1).index_fill(0, torch.tensor([0]), float("nan")).reshape(tensors[first].shape)
    elif attack == "huge_norm":
        tensors = {k: v * 1e15 + 1e15 for k, v in tensors.items()}
    elif attack == "negative_count":
        metrics["num-examples"] = -int(metrics["num-examples"]) - 1
    elif attack == "missing_key":
        del tensors[first]
    elif attack == "integer_dtype":
        tensors[first] = tensors[first].round().to(torch.int64)
    else:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    return RecordDict({"update": ArrayRecord(tensors), "metrics": MetricRecord(metrics)})


def attack_of(task: int, round_in_task: int, rounds_per_task: int) -> str:
    """The attack of one round: every attack in turn over the run's rounds."""
    return ATTACKS[(task * rounds_per_task + round_in_task) % len(ATTACKS)]
