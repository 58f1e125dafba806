"""Bounds on how far one well-formed reply can move a merge: a registered client may still lie.

Validation (:mod:`server_app.validation`) drops malformed replies; what is left is a client
whose reply is well-formed but dishonest. What it can lie about is its weight: the
``num-examples`` it claims (every averaging method weighs by it) and, for the methods that
merge Gram summaries (``lorm``, ``analytic``), its Grams, which weigh its numerators. After
validation and before any merge, every round's replies go through:

1. **Gram sanity** (``replies.psd_tolerance``): a diagonal Gram has no negative entry; a
   dense one is symmetric and positive semi-definite within the tolerance (``G + tol *
   trace(G) * I`` has a Cholesky factor); a reply claiming no examples has all-zero Grams;
   a numerator ``X^T Y`` with one-hot targets has ``||N||^2 <= n_k trace(X^T X)``.
2. **Per-example energy** (``replies.energy_factor``): ``trace(G_k) / n_k`` lies within that
   factor of the round's median, in either direction.
3. **Weighting** (``replies.weighting``): ``claimed`` keeps every claim; ``capped`` cuts a
   claim above ``cap_factor`` times the round's median claim to it, and scales a Gram
   whose trace is above ``cap_factor`` times the round's median trace (and the numerators
   pre-multiplied by it) down to it; ``uniform`` gives every reply with data the round's
   median claim and median Gram traces. Scaling a Gram with its numerators keeps the
   client's own solution and only changes its weight.

A reply failing 1 or 2 is dropped like an invalid one (the reason recorded in the round's
``failures``); a reply whose weight was cut is kept and recorded in the round's
``capped``. Medians are over the replies with data (``n_k > 0``); they stand for the
honest clients only while those are the majority of a round's replies.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from omegaconf import DictConfig

from fedcil.errors import choices_error
from fedcil.protocol import ClientUpdate, WeightedSums
from fedcil.settings import WEIGHTINGS, optional_float


@dataclass(frozen=True)
class InfluenceBounds:
    """``replies.weighting``, ``cap_factor``, ``energy_factor`` and ``psd_tolerance`` (None: that check off)."""

    weighting: str = "capped"
    cap_factor: float = 3.0
    energy_factor: float | None = 10.0
    psd_tolerance: float | None = 1e-6

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise choices_error("replies.weighting", self.weighting, list(WEIGHTINGS))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InfluenceBounds:
        r = cfg.replies
        return cls(str(r.weighting), float(r.cap_factor), optional_float(r.energy_factor), optional_float(r.psd_tolerance))


@dataclass
class Bounded:
    """A round's replies after the bounds: those kept, why others were dropped, whose weight was cut."""

    updates: list[ClientUpdate]
    dropped: dict[int, str] = field(default_factory=dict)
    capped: dict[int, str] = field(default_factory=dict)


def gram_problem(gram: torch.Tensor, tolerance: float) -> str | None:
    """Why ``gram`` is not a Gram (negative diagonal, asymmetric, indefinite), or None."""
    gram = gram.to(torch.float64)
    if gram.dim() == 1:
        negative = int((gram < 0).sum())
        return f"has {negative} negative entries" if negative else None
    size = float(torch.linalg.matrix_norm(gram))
    if float(torch.linalg.matrix_norm(gram - gram.T)) > tolerance * size:
        return "is not symmetric"
    trace = float(torch.trace(gram))
    if trace == 0 and not bool(gram.any()):
        return None
    shifted = gram + max(tolerance * trace, 0.0) * torch.eye(gram.shape[0], dtype=torch.float64)
    if trace < 0 or int(torch.linalg.cholesky_ex(shifted).info) != 0:
        return f"is not positive semi-definite within psd_tolerance={tolerance:g}"
    return None


def trace_of(gram: torch.Tensor) -> float:
    """The trace of a dense Gram or the sum of a diagonal one, in float64."""
    gram = gram.to(torch.float64)
    return float(gram.sum() if gram.dim() == 1 else torch.trace(gram))


def sanity_problem(update: ClientUpdate, sums: WeightedSums, tolerance: float | None) -> str | None:
    """Why ``update``'s Grams cannot be Grams of its data, or None."""
    for key in sorted(sums.grams):
        gram = update.tensors[key]
        if update.num_examples == 0 and bool(gram.any()):
            return f"{key} is not zero with num-examples=0"
        problem = None if tolerance is None else gram_problem(gram, tolerance)
        if problem:
            return f"{key} {problem}"
    for numerator, gram in sorted(sums.unit_targets.items()):
        squared = float(update.tensors[numerator].to(torch.float64).square().sum())
        bound = update.num_examples * trace_of(update.tensors[gram])
        if squared > bound * (1 + 1e-5):  # float32 replies
            return f"{numerator} has squared norm {squared:.3g} > num-examples x trace({gram}) = {bound:.3g}"
    return None


def energy_problems(updates: list[ClientUpdate], sums: WeightedSums, factor: float) -> dict[int, str]:
    """Per node, the first Gram whose energy per example is off the round's median by more than ``factor``."""
    problems: dict[int, str] = {}
    with_data = [u for u in updates if u.num_examples > 0]
    for key in sorted(sums.grams):
        energy = {u.node_id: trace_of(u.tensors[key]) / u.num_examples for u in with_data}
        median = statistics.median(energy.values()) if energy else 0.0
        if median <= 0:
            continue
        for node, value in energy.items():
            if node not in problems and not median / factor <= value <= median * factor:
                problems[node] = (f"{key} has energy per example {value:.3g}, the round's median is {median:.3g}; "
                                  f"allowed within energy_factor={factor:g}")
    return problems


def reweighted(update: ClientUpdate, sums: WeightedSums, count: int, scales: Mapping[str, float]) -> ClientUpdate:
    """``update`` claiming ``count`` examples, each Gram in ``scales`` scaled by its factor (with its numerators)."""
    tensors = dict(update.tensors)
    if count != update.num_examples:
        for key in sums.per_example:
            tensors[key] = tensors[key] * (count / update.num_examples)
    for gram, scale in scales.items():
        for key in (gram, *sums.grams[gram]):
            tensors[key] = tensors[key] * scale
    return replace(update, tensors=tensors, num_examples=count)


def target_weight(weight: float, median: float, bounds: InfluenceBounds) -> float:
    """The weight a reply keeps: its own (``claimed``), capped, or the median (``uniform``)."""
    if bounds.weighting == "uniform":
        return median
    if bounds.weighting == "capped":
        return min(weight, bounds.cap_factor * median)
    return weight


def bound_influence(updates: list[ClientUpdate], sums: WeightedSums, bounds: InfluenceBounds) -> Bounded:
    """The round's valid replies after the Gram checks and the weighting (see the module docstring)."""
    result = Bounded([])
    kept = []
    for update in updates:
        problem = sanity_problem(update, sums, bounds.psd_tolerance)
        if problem:
            result.dropped[update.node_id] = problem
        else:
            kept.append(update)
    if bounds.energy_factor is not None:
        result.dropped.update(energy_problems(kept, sums, bounds.energy_factor))
        kept = [u for u in kept if u.node_id not in result.dropped]
    with_data = [u for u in kept if u.num_examples > 0]
    if bounds.weighting == "claimed" or not with_data:
        result.updates = kept
        return result
    median_count = statistics.median(u.num_examples for u in with_data)
    median_trace = {key: statistics.median(trace_of(u.tensors[key]) for u in with_data) for key in sums.grams}
    for update in kept:
        if update.num_examples == 0:
            result.updates.append(update)
            continue
        count = max(1, math.floor(target_weight(update.num_examples, median_count, bounds)))
        traces = {key: trace_of(update.tensors[key]) for key in sums.grams}
        targets = {key: target_weight(traces[key], median_trace[key], bounds) for key in sums.grams}
        cut = [key for key in sorted(traces) if targets[key] != traces[key] and traces[key] > 0]
        if count == update.num_examples and not cut:
            result.updates.append(update)
            continue
        result.updates.append(reweighted(update, sums, count, {key: targets[key] / traces[key] for key in cut}))
        if bounds.weighting == "capped":
            result.capped[update.node_id] = capped_note(update.num_examples, count, cut, bounds.cap_factor)
    return result


def capped_note(claimed: int, count: int, cut: list[str], factor: float) -> str:
    """What ``capped`` did to one reply, for the round's record."""
    notes = [f"num-examples {claimed} -> {count}"] if count != claimed else []
    if cut:
        notes.append(f"{len(cut)} Gram weights cut (first {cut[0]})")
    return f"{'; '.join(notes)} (cap_factor={factor:g} x the round's median)"
