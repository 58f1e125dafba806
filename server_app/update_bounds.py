"""Update-size bounds for the methods that average trained tensors (``replies.update_factor``).

A client of ``fedavg_lora``, ``ffa_lora``, ``fedex_lora``, ``talora`` or ``head_only``
returns trained tensors; what it moves the average by is its *update*, the returned minus
the sent tensor. Its weight is bounded elsewhere (:mod:`server_app.influence`); nothing
there bounds the update's size, so a well-formed reply can push one tensor (say, one
class's bias) arbitrarily far.

An honest update grows with the optimiser steps a client takes, ``local_epochs x
ceil(n_k / batch_size)`` for its (bounded) count ``n_k``: a client with nine times the
steps moved its tensors about eight times further on skewed digits. The bound is
relative to the square root of the steps, ``r_k``: per tensor, a reply's update norm
divided by ``r_k`` may be at most ``update_factor`` times the round's median of that ratio;
above it, the update is scaled down to the bound, keeping its direction. The root is a
compromise: an honest client with ``s`` times the median steps may move
``update_factor x sqrt(s)`` times the median, while a liar whose claim the weighting cut
to half the round gains only the root of its extra steps.
Per tensor rather than per parameter group: an attacker cannot hide a large change of a
small tensor (the head's bias) behind the norm of a large one (the head's weight). Medians
are over the replies with data (``n_k > 0``); they stand for the honest clients only while
those are the majority of a round's replies. A cut is recorded in the round's ``capped``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch

from fedcil.protocol import ClientUpdate, TensorDict


def update_norms(update: ClientUpdate, sent: TensorDict) -> dict[str, float]:
    """Per tensor of ``update``, the L2 norm of its change from ``sent`` (float64)."""
    return {key: float(torch.linalg.vector_norm(value.to(torch.float64) - sent[key].to(torch.float64)))
            for key, value in update.tensors.items()}


def step_scale(num_examples: int, epochs: int, batch_size: int) -> float:
    """The square root of the optimiser steps of local training on ``num_examples`` examples (one an epoch at least)."""
    return math.sqrt(epochs * max(1, math.ceil(num_examples / batch_size)))


def bound_update_sizes(updates: list[ClientUpdate], sent: TensorDict, factor: float, epochs: int,
                       batch_size: int) -> tuple[list[ClientUpdate], dict[int, str]]:
    """``updates`` with every tensor's update cut to ``factor`` x the round's median of norm / :func:`step_scale`
    times the reply's own :func:`step_scale`, and, per node whose update was cut, what was cut."""
    steps = {u.node_id: step_scale(u.num_examples, epochs, batch_size) for u in updates}
    norms = {u.node_id: update_norms(u, sent) for u in updates if u.num_examples > 0}
    if not norms:
        return updates, {}
    keys = sorted(next(iter(norms.values())))
    per_step = {key: factor * statistics.median(n[key] / steps[node] for node, n in norms.items()) for key in keys}
    bounded, notes = [], {}
    for update in updates:
        own = norms.get(update.node_id, {})
        limits = {key: per_step[key] * steps[update.node_id] for key in own}
        cut = [key for key in keys if own.get(key, 0.0) > limits.get(key, 0.0)]
        if not cut:
            bounded.append(update)
            continue
        tensors = dict(update.tensors)
        for key in cut:
            base = sent[key].to(torch.float64)
            scaled = base + (limits[key] / own[key]) * (tensors[key].to(torch.float64) - base)
            tensors[key] = scaled.to(update.tensors[key].dtype)
        bounded.append(replace(update, tensors=tensors))
        largest = max(cut, key=lambda k: own[k] / max(limits[k], 1e-300))
        notes[update.node_id] = (f"update of {len(cut)} tensors cut (largest {largest}: norm {own[largest]:.3g} -> "
                                 f"{limits[largest]:.3g}; update_factor={factor:g} x the round's median, per root of the steps)")
    return bounded, notes
