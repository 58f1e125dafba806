"""What travels in Flower messages, in one place: server request and client reply.

Request (server -> client) ``RecordDict``:
    ``state``  ArrayRecord   the full trainable state (named tensors, see fedcil.model)
    ``base``   ArrayRecord   optional: what to add to the frozen ``W0`` of adapted layers,
                             per layer either ``<layer>.delta`` (dense) or the factors
                             ``<layer>.U`` and ``<layer>.V`` of ``delta = U V``
    ``gram-base`` ArrayRecord optional, same layout: the base of the model a method's Gram
                             pass runs under (training runs under ``base``); with the config's
                             ``gram-adapter-scale`` ``c``, that model is ``W0 + gram base + c s B A``
    ``config`` ConfigRecord  ``task``, ``round`` (within the task, from 0), ``train-groups``,
                             the plan's extras (``evaluate``, ``statistics``) and, when the
                             reply carries square Grams, ``packed-grams`` and ``gram-dtype``
Reply (client -> server) ``RecordDict``:
    ``update``  ArrayRecord  the trained tensors of the requested groups, the method's
                             statistics, or evaluation counts (``eval.correct``, ``eval.count``);
                             each Gram named in ``packed-grams`` as its upper triangle, row by
                             row (``d (d + 1) / 2`` entries), no wider than ``gram-dtype``
    ``metrics`` MetricRecord ``num-examples``, ``train-loss``

A Gram is symmetric, so its upper triangle holds all of it: packing halves a dense Gram's
bytes, and ``gram-dtype = float32`` halves them again. The server unpacks every reply into
square float64 matrices before anything checks or merges it (:meth:`Packing.unpack`); a sum of
packed triangles is the packed triangle of the sum, so secure aggregation sums them packed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcil.errors import choices_error

TensorDict = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
EVAL_CORRECT, EVAL_COUNT = "eval.correct", "eval.count"  # an evaluation reply's tensors: per-task counts
PACKED_GRAMS, GRAM_DTYPE = "packed-grams", "gram-dtype"  # a request's config keys of its Packing
GRAM_ADAPTER_SCALE = "gram-adapter-scale"  # a request's config key: the adapter's weight in the Gram pass's model
GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
"""``replies.gram_dtype``: the widest dtype a packed Gram travels in (one computed narrower keeps its own)."""


def param_group(name: str) -> str:
    """``lora_A``, ``lora_B`` or ``head`` for an exchange name (``blocks.0.attn.qkv.lora_A``, ``head.weight``)."""
    return name.rsplit(".", 1)[-1] if ".lora_" in name else "head"


def packed_length(size: int) -> int:
    """Entries of the upper triangle (diagonal included) of a ``size x size`` matrix."""
    return size * (size + 1) // 2


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the square ``matrix``, row by row, in its dtype."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cannot pack a tensor of shape {tuple(matrix.shape)}: not a square matrix")
    return matrix[torch.ones(matrix.shape, dtype=torch.bool).triu()]


def unpack_upper(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric float64 matrix whose upper triangle, row by row, is ``packed`` (its size follows from
    the length; ValueError when the length is no ``d (d + 1) / 2``)."""
    length = packed.numel()
    size = (math.isqrt(8 * length + 1) - 1) // 2
    if packed.dim() != 1 or packed_length(size) != length or not packed.is_floating_point():
        raise ValueError(f"a packed Gram of {packed.dtype} {tuple(packed.shape)} is no floating upper triangle "
                         "(d (d + 1) / 2 entries)")
    upper = torch.ones(size, size, dtype=torch.bool).triu()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix[upper] = packed.to(torch.float64)
    return torch.where(upper, matrix, matrix.T)


@dataclass(frozen=True)
class Packing:
    """Which tensors of a reply travel as packed upper triangles (its square Grams), and the widest dtype they take.

    The server derives it from what the method declares (:meth:`of`) and sends it with the request.
    """

    grams: tuple[str, ...] = ()
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.dtype not in GRAM_DTYPES:
            raise choices_error("gram dtype", self.dtype, list(GRAM_DTYPES))

    @classmethod
    def of(cls, sums: WeightedSums, expected: Shapes, dtype: str) -> Packing:
        """The square matrices among the Grams ``sums`` declares in a reply of shapes ``expected``."""
        square = [k for k in sums.grams if len(expected.get(k, ())) == 2 and expected[k][0] == expected[k][1]]
        return cls(tuple(sorted(square)), dtype)

    def wire_shapes(self, expected: Shapes) -> Shapes:
        """The shapes of a reply's tensors as they travel: a packed Gram of ``d x d`` as ``d (d + 1) / 2`` entries."""
        return {k: (packed_length(s[0]),) if k in self.grams else s for k, s in expected.items()}

    def pack(self, tensors: TensorDict) -> TensorDict:
        """``tensors`` as a client sends them: each Gram packed, rounded to ``dtype`` where it is wider."""
        wire = GRAM_DTYPES[self.dtype]

        def narrowed(t: torch.Tensor) -> torch.Tensor:
            return t.to(wire) if torch.finfo(t.dtype).bits > torch.finfo(wire).bits else t

        return {k: narrowed(pack_upper(v)) if k in self.grams else v for k, v in tensors.items()}

    def unpack(self, tensors: TensorDict) -> TensorDict:
        """``tensors`` as received with each packed Gram square (float64) again; ValueError for a malformed one."""
        return {k: unpack_upper(v) if k in self.grams else v for k, v in tensors.items()}


@dataclass(frozen=True)
class RoundPlan:
    """What the server sends for one round: the full trainable state and instructions.

    ``train_groups`` names the parameter groups clients train (of ``lora_A``,
    ``lora_B``, ``head``); clients reply with the trained tensors of those groups, unless
    ``extra`` asks for an evaluation (``evaluate``) or for a method's statistics
    (``statistics``: a kind the method's strategy names and its client hook computes).
    ``packing`` names the reply's Grams that travel packed (set by the server's sender).
    ``base`` is added to ``W0`` for everything the client does; ``gram_base`` (with
    ``extra[GRAM_ADAPTER_SCALE]``) replaces it for a method's Gram pass only.
    """

    state: TensorDict
    train_groups: tuple[str, ...]
    extra: dict[str, int | float | str | bool] = field(default_factory=dict)
    base: TensorDict = field(default_factory=dict)
    packing: Packing = Packing()
    gram_base: TensorDict = field(default_factory=dict)

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
    packing: Packing = Packing()
    gram_base: TensorDict = field(default_factory=dict)

    @property
    def gram_adapter_scale(self) -> float:
        """The trained adapter's weight in the model of the Gram pass (1 unless the request says)."""
        return float(self.extra.get(GRAM_ADAPTER_SCALE, 1.0))


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
    if plan.packing.grams:
        config |= {PACKED_GRAMS: list(plan.packing.grams), GRAM_DTYPE: plan.packing.dtype}
    records = {"state": ArrayRecord(plan.state), "config": ConfigRecord(config)}
    for name, base in (("base", plan.base), ("gram-base", plan.gram_base)):
        if base:
            records[name] = ArrayRecord({k: v.float() for k, v in base.items()})
    return RecordDict(records)


def decode_request(content: RecordDict) -> TrainRequest:
    """Parse a request RecordDict (raises KeyError when a part is missing)."""
    config = dict(content.config_records["config"])
    arrays = content.array_records
    return TrainRequest(
        task=int(config.pop("task")),
        round_in_task=int(config.pop("round")),
        state=arrays["state"].to_torch_state_dict(),
        train_groups=tuple(config.pop("train-groups")),
        extra=config,
        base=arrays["base"].to_torch_state_dict() if "base" in arrays else {},
        packing=Packing(tuple(config.pop(PACKED_GRAMS, [])), str(config.pop(GRAM_DTYPE, "float64"))),
        gram_base=arrays["gram-base"].to_torch_state_dict() if "gram-base" in arrays else {},
    )


def unpack_base(base: TensorDict) -> TensorDict:
    """Per layer, the dense delta of a request's ``base`` (``U V`` for factored layers)."""
    deltas = {k.removesuffix(".delta"): v for k, v in base.items() if k.endswith(".delta")}
    for key, factor in base.items():
        if key.endswith(".U"):
            deltas[key.removesuffix(".U")] = factor @ base[key.removesuffix(".U") + ".V"]
    return deltas


def encode_reply(tensors: TensorDict, num_examples: int, loss: float, packing: Packing = Packing()) -> RecordDict:
    """The reply RecordDict of one client (its Grams packed as the request's ``packing`` says)."""
    return RecordDict(
        {
            "update": ArrayRecord(packing.pack({k: v.detach().cpu() for k, v in tensors.items()})),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": float(loss)}),
        }
    )


def decode_reply(node_id: int, content: RecordDict, packing: Packing = Packing()) -> ClientUpdate:
    """Parse a reply RecordDict, its packed Grams made square (raises when a part is missing or a
    packed Gram is no triangle; ``num-examples`` kept as sent).

    Nothing here trusts the sender: :mod:`server_app.validation` checks the result.
    """
    metrics = content.metric_records["metrics"]
    return ClientUpdate(
        node_id=node_id,
        tensors=packing.unpack(content.array_records["update"].to_torch_state_dict()),
        num_examples=metrics["num-examples"],  # type: ignore[arg-type]  # checked by the validator
        loss=float(metrics["train-loss"]),
    )
