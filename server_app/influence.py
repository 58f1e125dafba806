"""Bounds on how far one well-formed reply can move a merge: a registered client may still lie.

Validation (:mod:`server_app.validation`) drops malformed replies; what is left is a client
whose reply is well-formed but dishonest. What it can lie about is its weight: the
``num-examples`` it claims (every averaging method weighs by it) and, for the methods that
merge Gram summaries (``lorm``, ``analytic``), its Grams, which weigh its numerators. After
validation and before any merge, every round's replies go through:

1. **Gram sanity** (``replies.psd_tolerance``): a diagonal Gram has no negative entry; a
   dense one is symmetric and positive semi-definite within the tolerance (``G + tol *
   trace(G) * I`` has a Cholesky factor); a reply claiming no examples has every summed
   tensor zero (Grams, numerators, per-example tensors); a numerator ``X^T Y`` with one-hot
   targets has ``||N||^2 <= n_k trace(X^T X)``.
2. **Per-example energy** (``replies.energy_factor``): ``trace(G_k) / n_k`` lies within that
   factor of the round's median, in either direction.
3. **Weighting** (``replies.weighting``): ``claimed`` keeps every claim; ``bounded`` cuts a
   claim above ``max_share`` of the round's total claims to that share, i.e. to
   ``max_share / (1 - max_share)`` times the other replies' total (with its Grams and
   numerators, so its statistics per example stay); ``capped`` cuts a
   claim above ``cap_factor`` times the round's median claim to it, and scales a Gram
   whose trace is above ``cap_factor`` times the round's median trace (and the numerators
   pre-multiplied by it) down to it; ``uniform`` gives every reply with data the round's
   median claim and median Gram traces. Scaling a Gram with its numerators keeps the
   client's own solution and only changes its weight.
4. **Directions** (``replies.direction_factor``, off by default): a Gram per example
   ``P_k = G_k / n_k`` may exceed ``direction_factor`` times the other replies' mean ``M``
   in no direction: its largest generalised eigenvalue ``lambda`` against ``M + rho I``
   (per entry for a diagonal Gram), ``rho = DIRECTION_RIDGE x trace(P) / d`` with ``P`` the
   mean of every reply's ``P_j``, is at most the factor, else the Gram and its numerators
   are scaled down by ``factor / lambda``. The round records the largest ``lambda`` of any
   reply's Gram (before any cut), so that honest runs show how high a factor they need.

A reply failing 1 or 2 is dropped like an invalid one (the reason recorded in the round's
``failures``), and so is every reply of a round in which none claims an example (nothing to
weigh a merge by); a reply whose weight was cut is kept and recorded in the round's
``capped``. Medians and means are over the replies with data (``n_k > 0``); medians stand
for the honest clients only while those are the majority of a round's replies, means of
the others only while one reply lies (see docs/security.md).
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


DIRECTION_RIDGE = 1e-2
"""``rho`` in units of the replies' mean eigenvalue per example: the others' mean ``M`` gets ``rho I`` before the
direction test, so that a direction no other reply uses admits ``direction_factor x rho`` per example, not zero."""


@dataclass(frozen=True)
class InfluenceBounds:
    """``replies.weighting``, ``cap_factor``, ``max_share``, ``energy_factor``, ``psd_tolerance``, ``direction_factor``
    (None: that check off)."""

    weighting: str = "bounded"
    cap_factor: float = 3.0
    max_share: float = 0.5
    energy_factor: float | None = 10.0
    psd_tolerance: float | None = 1e-6
    direction_factor: float | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise choices_error("replies.weighting", self.weighting, list(WEIGHTINGS))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InfluenceBounds:
        r = cfg.replies
        return cls(str(r.weighting), float(r.cap_factor), float(r.max_share), optional_float(r.energy_factor),
                   optional_float(r.psd_tolerance), optional_float(r.direction_factor))


@dataclass(frozen=True)
class DirectionRatio:
    """A direction ratio ``lambda`` (item 4 above): its value, its Gram and the node whose reply it is."""

    ratio: float
    gram: str
    node: int


def largest_ratio(*ratios: DirectionRatio | None) -> DirectionRatio | None:
    """The largest of ``ratios`` that are not None (None if all are)."""
    return max((r for r in ratios if r is not None), key=lambda r: r.ratio, default=None)


@dataclass
class Bounded:
    """A round's replies after the bounds: those kept, why others were dropped, whose weight was cut,
    and the largest direction ratio of their Grams (with ``replies.direction_factor`` set)."""

    updates: list[ClientUpdate]
    dropped: dict[int, str] = field(default_factory=dict)
    capped: dict[int, str] = field(default_factory=dict)
    direction_ratio: DirectionRatio | None = None


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


def summed_tensors(sums: WeightedSums) -> list[str]:
    """Every tensor ``sums`` declares: the Grams, the numerators they weigh, the per-example tensors."""
    names = {*sums.grams, *(n for numerators in sums.grams.values() for n in numerators), *sums.per_example, *sums.unit_targets}
    return sorted(names)


def sanity_problem(update: ClientUpdate, sums: WeightedSums, tolerance: float | None) -> str | None:
    """Why ``update``'s Grams cannot be Grams of its data, or None."""
    if update.num_examples == 0:
        nonzero = [key for key in summed_tensors(sums) if bool(update.tensors[key].any())]
        if nonzero:
            return f"{nonzero[0]} is not zero with num-examples=0"
    for key in sorted(sums.grams):
        problem = None if tolerance is None else gram_problem(update.tensors[key], tolerance)
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


def direction_ratios(per_example: list[torch.Tensor], ridge: float = DIRECTION_RIDGE) -> list[float]:
    """Per Gram ``P_k``, its largest generalised eigenvalue against the others' mean plus a ridge.

    ``lambda_k = max_v v^T P_k v / v^T (M_k + rho I) v`` with ``M_k`` the mean of the other
    ``K - 1`` Grams and ``rho = ridge x trace(mean of all) / d``; per entry for diagonal
    Grams. With ``S = sum_j P_j + (K - 1) rho I = P_k + (K - 1)(M_k + rho I)`` and ``mu_k``
    the largest eigenvalue of ``L^-1 P_k L^-T`` (``S = L L^T``), ``lambda_k = (K - 1) mu_k /
    (1 - mu_k)``: one Cholesky factor serves every reply. Needs ``K >= 2`` and a non-zero sum.
    """
    others = len(per_example) - 1
    grams = [p.to(torch.float64) for p in per_example]
    total = sum(grams[1:], grams[0])
    rho = ridge * trace_of(total) / (len(grams) * total.shape[0])
    if total.dim() == 1:
        shares = [float((p / (total + others * rho)).max()) for p in grams]
    else:
        factor = torch.linalg.cholesky(total + others * rho * torch.eye(total.shape[0], dtype=torch.float64))
        shares = []
        for p in grams:
            half = torch.linalg.solve_triangular(factor, p, upper=False)
            whitened = torch.linalg.solve_triangular(factor, half.T, upper=False)
            shares.append(float(torch.linalg.eigvalsh((whitened + whitened.T) / 2)[-1]))
    return [others * mu / (1 - mu) for mu in (min(share, 1 - 1e-15) for share in shares)]


def direction_scales(
    with_data: list[ClientUpdate], sums: WeightedSums, cap: float
) -> tuple[dict[int, dict[str, float]], DirectionRatio | None]:
    """Per node, the Grams whose per-example direction ratio exceeds ``cap``, each with ``cap / lambda``;
    and the largest ratio of any reply's Gram (None where no Gram has two replies with data)."""
    scales: dict[int, dict[str, float]] = {u.node_id: {} for u in with_data}
    largest = None
    for key in sorted(sums.grams):
        per_example = [u.tensors[key].to(torch.float64) / u.num_examples for u in with_data]
        if len(per_example) < 2 or sum(trace_of(p) for p in per_example) <= 0:
            continue
        for update, ratio in zip(with_data, direction_ratios(per_example), strict=True):
            largest = largest_ratio(largest, DirectionRatio(ratio, key, update.node_id))
            if ratio > cap:
                scales[update.node_id][key] = cap / ratio
    return scales, largest


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


def target_weight(weight: float, others: list[float], median: float, bounds: InfluenceBounds) -> float:
    """The weight a reply keeps: its own (``claimed``), bounded by the others' total or the median, or the median."""
    if bounds.weighting == "uniform":
        return median
    if bounds.weighting == "capped":
        return min(weight, bounds.cap_factor * median)
    if bounds.weighting == "bounded" and others:
        return min(weight, bounds.max_share / (1 - bounds.max_share) * sum(others))
    return weight


def weight_scales(
    with_data: list[ClientUpdate], sums: WeightedSums, bounds: InfluenceBounds
) -> dict[int, tuple[int, dict[str, float]]]:
    """Per node, its count and Gram scales under the weighting (before the direction bound)."""
    counts = {u.node_id: float(u.num_examples) for u in with_data}
    median_count = statistics.median(counts.values())
    traces = {key: {u.node_id: trace_of(u.tensors[key]) for u in with_data} for key in sums.grams}
    weights = {}
    for node, claimed in counts.items():
        others = [n for other, n in counts.items() if other != node]
        count = max(1, math.floor(target_weight(claimed, others, median_count, bounds)))
        if bounds.weighting == "bounded":  # the Grams follow the count: statistics per example stay
            scales = {key: count / claimed for key in sums.grams} if count != claimed else {}
        else:
            scales = {}
            for key, by_node in traces.items():
                target = target_weight(by_node[node], [], statistics.median(by_node.values()), bounds)
                if target != by_node[node] and by_node[node] > 0:
                    scales[key] = target / by_node[node]
        weights[node] = (count, scales)
    return weights


def bound_influence(updates: list[ClientUpdate], sums: WeightedSums, bounds: InfluenceBounds) -> Bounded:
    """The round's valid replies after the Gram checks, the weighting and the direction bound (module docstring)."""
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
    if not with_data:  # nothing to weigh by: every merge would divide by zero
        result.dropped.update({u.node_id: "no reply of the round claims an example" for u in kept})
        return result
    directions: dict[int, dict[str, float]] = {}
    if bounds.direction_factor is not None:
        directions, result.direction_ratio = direction_scales(with_data, sums, bounds.direction_factor)
    if bounds.weighting == "claimed" and not any(directions.values()):
        result.updates = kept
        return result
    weights = weight_scales(with_data, sums, bounds)
    for update in kept:
        if update.num_examples == 0:
            result.updates.append(update)
            continue
        count, scales = weights[update.node_id]
        turned = directions.get(update.node_id, {})
        combined = {key: scales.get(key, 1.0) * turned.get(key, 1.0) for key in sorted({*scales, *turned})}
        if count == update.num_examples and not combined:
            result.updates.append(update)
            continue
        result.updates.append(reweighted(update, sums, count, combined))
        if bounds.weighting != "uniform" or turned:
            result.capped[update.node_id] = capped_note(update.num_examples, count, sorted(scales), turned, bounds)
    return result


def capped_note(claimed: int, count: int, cut: list[str], turned: Mapping[str, float], bounds: InfluenceBounds) -> str:
    """What the weighting and the direction bound did to one reply, for the round's record."""
    notes = [f"num-examples {claimed} -> {count}"] if count != claimed and bounds.weighting != "uniform" else []
    if cut and bounds.weighting == "capped":
        notes.append(f"{len(cut)} Gram weights cut (first {cut[0]})")
    if notes:
        notes[-1] += (f" (max_share={bounds.max_share:g} of the round's claims)" if bounds.weighting == "bounded"
                      else f" (cap_factor={bounds.cap_factor:g} x the round's median)")
    if turned:
        first = min(turned)
        notes.append(f"{len(turned)} Grams cut in their strongest direction (first {first} x {turned[first]:.3g}; "
                     f"direction_factor={bounds.direction_factor:g} x the others' mean per example)")
    return "; ".join(notes)
