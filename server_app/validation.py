"""Every client reply is checked before it reaches a strategy: a server must not trust its clients.

A reply passes when it decodes (each Gram the request asked to pack,
:class:`fedcil.protocol.Packing`, a floating upper triangle, made square float64 here), carries
exactly the tensors its request asks for (names and shapes as the method's strategy declares
them: ``expected_reply(plan, task)``), in a floating
dtype, every value finite and every tensor's L2 norm within ``replies.max_norm``; its
``num-examples`` is an integer in ``0..replies.max_examples`` (0 is honest: a client may hold
no data of a task) and its loss is finite; an evaluation's per-task counts are
non-negative integers with ``correct <= count``. Anything else raises :class:`InvalidReply`,
and only that, whatever the bytes; the round goes on without that client.

``replies.clip_norm`` (robust aggregation, off by default) scales each client's update
(trained minus sent tensors) down to that L2 norm, for methods whose replies are trained
tensors; it bounds what one client can move the average, at the price of exactness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from flwr.app import RecordDict
from omegaconf import DictConfig

from fedcil.protocol import EVAL_COUNT, EVAL_CORRECT, ClientUpdate, Packing, Shapes, decode_reply
from fedcil.settings import optional_float

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EVAL_KEYS = (EVAL_CORRECT, EVAL_COUNT)


class InvalidReply(ValueError):
    """A client reply that must not reach a merge; the message says why."""


class TooFewReplies(RuntimeError):
    """Fewer valid replies than a round needs: the run stops, its last checkpoint kept."""


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds on what a reply may claim (``replies`` in the config)."""

    max_examples: int
    max_norm: float
    clip_norm: float | None = None
    update_factor: float | None = None  # server_app.update_bounds

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ReplyLimits:
        r = cfg.replies
        return cls(int(r.max_examples), float(r.max_norm), optional_float(r.clip_norm), optional_float(r.update_factor))


def checked_update(
    node_id: int, content: RecordDict, expected: Shapes, limits: ReplyLimits, packing: Packing = Packing()
) -> ClientUpdate:
    """The decoded reply of ``node_id`` (its Grams packed as ``packing`` says) if it is valid; :class:`InvalidReply` otherwise."""
    try:
        update = decode_reply(node_id, content, packing)
    except Exception as exc:  # whatever the bytes make the decoder raise
        raise InvalidReply(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return checked(update, expected, limits)


def checked(update: ClientUpdate, expected: Shapes, limits: ReplyLimits) -> ClientUpdate:
    """``update`` if its count, loss and tensors are within ``limits`` and ``expected``; :class:`InvalidReply` otherwise."""
    n = update.num_examples
    if type(n) is not int or not 0 <= n <= limits.max_examples:
        raise InvalidReply(f"num-examples={n!r} is not an integer in 0..{limits.max_examples}")
    if not math.isfinite(update.loss):
        raise InvalidReply(f"train-loss={update.loss!r} is not finite")
    missing, unexpected = sorted(set(expected) - set(update.tensors)), sorted(set(update.tensors) - set(expected))
    if missing or unexpected:
        raise InvalidReply(f"tensors missing {missing[:3]} unexpected {unexpected[:3]}")
    for key, tensor in update.tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise InvalidReply(f"{key} has shape {tuple(tensor.shape)}, expected {expected[key]}")
        if tensor.dtype not in FLOATING:
            raise InvalidReply(f"{key} has dtype {tensor.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidReply(f"{key} has non-finite values")
        norm = float(torch.linalg.vector_norm(tensor.to(torch.float64)))
        if norm > limits.max_norm:
            raise InvalidReply(f"{key} has L2 norm {norm:.3g} > replies.max_norm={limits.max_norm:g}")
    if set(expected) == set(EVAL_KEYS):
        correct, count = update.tensors[EVAL_CORRECT], update.tensors[EVAL_COUNT]
        whole = bool((correct == correct.round()).all() and (count == count.round()).all())
        if not whole or bool((correct < 0).any()) or bool((correct > count).any()):
            raise InvalidReply("evaluation counts are not integers with 0 <= correct <= count")
    return update


def clipped(update: ClientUpdate, sent: dict[str, torch.Tensor], clip_norm: float) -> ClientUpdate:
    """``update`` with its change from ``sent`` scaled to an L2 norm of at most ``clip_norm``."""
    deltas = {k: v.to(torch.float64) - sent[k].to(torch.float64) for k, v in update.tensors.items()}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    if norm <= clip_norm:
        return update
    scale = clip_norm / norm
    tensors = {k: (sent[k].to(torch.float64) + scale * d).to(update.tensors[k].dtype) for k, d in deltas.items()}
    return replace(update, tensors=tensors)
