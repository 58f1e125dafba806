"""Update-size bounds for the methods that average trained tensors (``replies.update_factor``).

A client of ``fedavg_lora``, ``ffa_lora``, ``fedex_lora``, ``talora`` or ``head_only``
returns trained tensors; what it moves the average by is its *update*, the returned minus
the sent tensor. Its weight is bounded elsewhere (:mod:`server_app.influence`); nothing
there bounds the update's size, so a well-formed reply can push one tensor (say, one
class's row of the head) arbitrarily far. Here, per tensor, every reply's update is scaled
down to at most ``update_factor`` times the round's median norm of that tensor's updates.

Per tensor rather than per parameter group: an attacker cannot hide a large change of a
small tensor (the head's bias) behind the norm of a large one (the head's weight). Medians
are over the replies with data (``n_k > 0``); they stand for the honest clients only while
those are the majority of a round's replies. Honest clients train the same number of
epochs from the same state, so their update norms lie close together: the bound leaves
them alone and is recorded in the round's ``capped`` whenever it cuts.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from fedcil.protocol import ClientUpdate, TensorDict


def update_norms(update: ClientUpdate, sent: TensorDict) -> dict[str, float]:
    """Per tensor of ``update``, the L2 norm of its change from ``sent`` (float64)."""
    return {key: float(torch.linalg.vector_norm(value.to(torch.float64) - sent[key].to(torch.float64)))
            for key, value in update.tensors.items()}


def bound_update_sizes(updates: list[ClientUpdate], sent: TensorDict, factor: float) -> tuple[list[ClientUpdate], dict[int, str]]:
    """``updates`` with every tensor's update cut to ``factor`` x the round's median norm of it,
    and, per node whose update was cut, what was cut."""
    norms = {u.node_id: update_norms(u, sent) for u in updates if u.num_examples > 0}
    if not norms:
        return updates, {}
    keys = sorted(next(iter(norms.values())))
    limits = {key: factor * statistics.median(n[key] for n in norms.values()) for key in keys}
    bounded, notes = [], {}
    for update in updates:
        own = norms.get(update.node_id, {})
        cut = [key for key in keys if own.get(key, 0.0) > limits[key]]
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
                                 f"{limits[largest]:.3g}; update_factor={factor:g} x the round's median)")
    return bounded, notes
