"""What travels in Flower messages, in one place: server request and client reply.

Request (server -> client) ``RecordDict``:
    ``state``  ArrayRecord   the full trainable state (named tensors, see fedcil.model)
    ``base``   ArrayRecord   optional: what to add to the frozen ``W0`` of adapted layers,
                             per layer either ``<layer>.delta`` (dense) or the factors
                             ``<layer>.U`` and ``<layer>.V`` of ``delta = U V``
    ``config`` ConfigRecord  ``task``, ``round`` (within the task, from 0), ``train-groups``
                             and the plan's extras (``evaluate``, ``statistics``)
Reply (client -> server) ``RecordDict``:
    ``update``  ArrayRecord  the trained tensors of the requested groups, the method's
                             statistics, or evaluation counts (``eval.correct``, ``eval.count``)
    ``metrics`` MetricRecord ``num-examples``, ``train-loss``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

TensorDict = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
EVAL_CORRECT, EVAL_COUNT = "eval.correct", "eval.count"  # an evaluation reply's tensors: per-task counts


def param_group(name: str) -> str:
    """``lora_A``, ``lora_B`` or ``head`` for an exchange name (``blocks.0.attn.qkv.lora_A``, ``head.weight``)."""
    return name.rsplit(".", 1)[-1] if ".lora_" in name else "head"


@dataclass(frozen=True)
class RoundPlan:
    """What the server sends for one round: the full trainable state and instructions.

    ``train_groups`` names the parameter groups clients train (of ``lora_A``,
    ``lora_B``, ``head``); clients reply with the trained tensors of those groups, unless
    ``extra`` asks for an evaluation (``evaluate``) or for a method's statistics
    (``statistics``: a kind the method's strategy names and its client hook computes).
    """

    state: TensorDict
    train_groups: tuple[str, ...]
    extra: dict[str, int | float | str | bool] = field(default_factory=dict)
    base: TensorDict = field(default_factory=dict)

    @property
    def evaluates(self) -> bool:
        """Whether this plan asks clients to evaluate the sent model."""
        return bool(self.extra.get("evaluate"))

    @property
    def returns_trained_tensors(self) -> bool:
        """Whether replies are the trained tensors of ``train_groups`` (not statistics, not counts)."""
        return not self.evaluates and str(self.extra.get("statistics", "none")) == "none"


@dataclass(frozen=True)
class TrainRequest:
    """A client's view of a round's request."""

    task: int
    round_in_task: int
    state: TensorDict
    train_groups: tuple[str, ...]
    extra: dict
    base: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a training round (or, under secure aggregation, the sum of ``clients`` replies)."""

    node_id: int
    tensors: TensorDict
    num_examples: int
    loss: float
    clients: int = 1


@dataclass(frozen=True)
class WeightedSums:
    """What a reply's weight is made of, as a strategy declares it for one request.

    ``grams`` maps every Gram in the reply to the numerators pre-multiplied by it (``W_k G_k``);
    ``per_example`` names tensors that are ``n_k`` times a value (e.g. LoRM's ``n_k b_k``).
    Nothing declared: the reply's weight is its ``num-examples`` alone (the averaging methods).
    """

    grams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    per_example: tuple[str, ...] = ()
    unit_targets: Mapping[str, str] = field(default_factory=dict)
    """Numerators ``N = X^T Y`` whose targets ``Y`` have rows of norm 1 (one-hot labels), each with the
    Gram ``X^T X`` of the same rows: by Cauchy-Schwarz ``||N||_F^2 <= n_k trace(X^T X)``."""


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


def encode_request(plan: RoundPlan, task: int, round_in_task: int) -> RecordDict:
    """The request RecordDict for one round (``round_in_task`` counts from 0 within ``task``)."""
    config = {"task": task, "round": round_in_task, "train-groups": list(plan.train_groups), **plan.extra}
    records = {"state": ArrayRecord(plan.state), "config": ConfigRecord(config)}
    if plan.base:
        records["base"] = ArrayRecord({k: v.float() for k, v in plan.base.items()})
    return RecordDict(records)


def decode_request(content: RecordDict) -> TrainRequest:
    """Parse a request RecordDict (raises KeyError when a part is missing)."""
    config = dict(content.config_records["config"])
    return TrainRequest(
        task=int(config.pop("task")),
        round_in_task=int(config.pop("round")),
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
