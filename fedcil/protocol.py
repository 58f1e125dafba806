"""What travels in Flower messages, in one place: server request and client reply.

Request (server -> client) ``RecordDict``:
    ``state``  ArrayRecord   the full trainable state (named tensors, see fedcil.model)
    ``base``   ArrayRecord   optional: what to add to the frozen ``W0`` of adapted layers,
                             per layer either ``<layer>.delta`` (dense) or the factors
                             ``<layer>.U`` and ``<layer>.V`` of ``delta = U V``
    ``config`` ConfigRecord  ``task``, ``round``, ``train-groups`` and method extras
Reply (client -> server) ``RecordDict``:
    ``update``  ArrayRecord  the trained tensors of the requested groups
    ``metrics`` MetricRecord ``num-examples``, ``train-loss``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

TensorDict = dict[str, torch.Tensor]
EVAL_CORRECT, EVAL_COUNT = "eval.correct", "eval.count"  # an evaluation reply's tensors: per-task counts


@dataclass(frozen=True)
class RoundPlan:
    """What the server sends for one round: the full trainable state and instructions.

    ``train_groups`` names the parameter groups clients train (of ``lora_A``,
    ``lora_B``, ``head``); clients reply with the trained tensors of those groups.
    """

    state: TensorDict
    train_groups: tuple[str, ...]
    extra: dict[str, int | float | str | bool] = field(default_factory=dict)
    base: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainRequest:
    """A client's view of a round's request."""

    task: int
    server_round: int
    state: TensorDict
    train_groups: tuple[str, ...]
    extra: dict
    base: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a training round."""

    node_id: int
    tensors: TensorDict
    num_examples: int
    loss: float


def canonical_order(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Replies in an order that does not depend on arrival or node ids.

    Floating-point sums depend on the order of their terms, and a last-bit difference
    grows over rounds of training; sorting by size, loss and content makes a run reproducible whatever
    order the replies arrive in (and equal to the same clients trained in a plain loop).
    """
    return sorted(updates, key=lambda u: (u.num_examples, u.loss, content_sum(u.tensors), u.node_id))


def content_sum(tensors: TensorDict) -> float:
    """A float64 sum over every tensor's entries: a tie-breaker between equal-sized replies."""
    return float(sum(t.to(torch.float64).sum() for t in tensors.values()))


def encode_request(plan: RoundPlan, task: int, server_round: int) -> RecordDict:
    """The request RecordDict for one round."""
    config = {"task": task, "round": server_round, "train-groups": list(plan.train_groups), **plan.extra}
    records = {"state": ArrayRecord(plan.state), "config": ConfigRecord(config)}
    if plan.base:
        records["base"] = ArrayRecord({k: v.float() for k, v in plan.base.items()})
    return RecordDict(records)


def decode_request(content: RecordDict) -> TrainRequest:
    """Parse a request RecordDict (raises KeyError when a part is missing)."""
    config = dict(content.config_records["config"])
    return TrainRequest(
        task=int(config.pop("task")),
        server_round=int(config.pop("round")),
        state=content.array_records["state"].to_torch_state_dict(),
        train_groups=tuple(config.pop("train-groups")),
        extra=config,
        base=content.array_records["base"].to_torch_state_dict() if "base" in content.array_records else {},
    )


def unpack_base(base: TensorDict) -> TensorDict:
    """Per layer, the dense delta of a request's ``base`` (``U V`` for factored layers)."""
    deltas = {k.removesuffix(".delta"): v for k, v in base.items() if k.endswith(".delta")}
    for key, factor in base.items():
        if key.endswith(".U"):
            deltas[key.removesuffix(".U")] = factor @ base[key.removesuffix(".U") + ".V"]
    return deltas


def encode_reply(tensors: TensorDict, num_examples: int, loss: float) -> RecordDict:
    """The reply RecordDict of one client."""
    return RecordDict(
        {
            "update": ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": float(loss)}),
        }
    )


def decode_reply(node_id: int, content: RecordDict) -> ClientUpdate:
    """Parse a reply RecordDict (raises when a part is missing; ``num-examples`` kept as sent).

    Nothing here trusts the sender: :mod:`server_app.validation` checks the result.
    """
    metrics = content.metric_records["metrics"]
    return ClientUpdate(
        node_id=node_id,
        tensors=content.array_records["update"].to_torch_state_dict(),
        num_examples=metrics["num-examples"],  # type: ignore[arg-type]  # checked by the validator
        loss=float(metrics["train-loss"]),
    )
