"""Analytic classifier: federated closed-form ridge regression on frozen features
(RanPAC, McDonnell et al., NeurIPS 2023; federated as in AFCL and FedRAN).

No gradient step anywhere. What the head sees, ``z``, is fixed by the model: the frozen
backbone's pooled features ``h`` (``method.blocks = null``), or the CLS and mean patch tokens
of the blocks ``method.blocks``, standardised per feature, ``(h - mu) / sigma``; then, with
``method.projection_dim = M > 0``, ``ReLU(R z)`` for a fixed seeded random ``R``.

The standardiser (``mu``, ``sigma``) comes from the first task's data, from sums only: in
task 0's rounds every client ``k`` sends ``S_k = sum_i h_i`` and ``Q_k = sum_i h_i^2`` (per
feature) with its count ``n_k``; the server sets ``mu = S / n`` and ``sigma^2 = Q / n -
mu^2`` and keeps them for the rest of the run. Then, for task ``t`` (task 0: in its
end-of-task exchange, under the fixed standardiser) every client sends, with ``Y_k`` the
one-hot labels over every class::

    G_k = Z_k^T Z_k,    C_k = Z_k^T Y_k

The server keeps ``G = sum_{t,k} G_k``, ``C = sum_{t,k} C_k`` and ``n = sum_{t,k} n_k`` over
clients and tasks and sets the head to::

    W = (G + eps I)^-1 C   (head.weight = W^T, head.bias = 0),   eps = ridge * mean(diag(G))

in float64: exactly centralised ridge regression on the union of every client's data of
every task seen, whatever the partition, the client order and the task order. With
``method.ridge = gcv`` the server picks ``ridge`` from :data:`RIDGE_GRID` by generalised
cross-validation computed from ``G``, ``C`` and ``n`` alone (:func:`gcv_ridge`; the sum of
the squared one-hot targets is ``n``), never from test data; the choice is recorded in each
round's entry of ``results.json``. With ``method.ridge = validation`` the clients choose it
instead, on a hold-out of their own training images (:func:`holdout_mask`: a seeded fraction
``method.holdout`` of each client's current-task images): the task's sums round also asks for
``G_k``, ``C_k`` of the rest (``fit.G``, ``fit.C``); the task-end exchange sends the heads
of :data:`VALIDATION_GRID` solved on the earlier tasks' sums plus the current task's fit sums,
each client returns per head how many of its hold-out images it predicts right (``correct``,
bounded by its hold-out size on the server), and the head is then solved on every task's
whole sums at the ridge with the most (ties: the larger). Task 0 with a standardiser has no
exchange left after its sums (the moments come first), and a task without hold-out images
none to count: there GCV chooses. Sums only, so the merge suits secure aggregation. One
round per task is enough: a task's later rounds recompute the same sums (with
``fraction_train < 1`` the task's last round's clients count). The adapters are never used
(``B = 0``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedcil.closed_form import merge_with_grams, ridge_of
from fedcil.protocol import ClientUpdate, RoundPlan, Shapes, TensorDict, WeightedSums
from fedcil.tasks import TaskSplit
from strategies.aggregation import sum_updates
from strategies.base import ClientRound, FederatedStrategy

if TYPE_CHECKING:
    from omegaconf import DictConfig

STATISTICS = "analytic"  # G, C of what the head sees
MOMENTS = "moments"  # S, Q of the features before the standardiser (task 0 only)
SUMS = ("G", "C", "n")  # Z^T Z, Z^T Y and the count
MOMENT_SUMS = ("S", "Q")  # sum h and sum h^2 per feature
STANDARDISER = ("standardise.shift", "standardise.scale")
RIDGE_GRID = tuple(10.0 ** (exponent / 4) for exponent in range(-20, 9))
"""The relative ridges ``gcv`` chooses among: 1e-5 to 100, four per decade. Below 1e-5 a solve would mostly
amplify the rounding of Grams sent in float32 (about 6e-8 of each entry)."""
GCV, VALIDATION = "gcv", "validation"  # method.ridge chosen by the server from sums, or on the clients' hold-outs
VALIDATION_GRID = RIDGE_GRID[::4]
"""The relative ridges ``validation`` scores: 1e-5 to 100, one per decade."""
SCORES = "scores"  # the task-end request of validation: candidate heads to score on the hold-outs
FIT = ("fit.G", "fit.C")  # G_k, C_k of the client's images outside its hold-out
CORRECT = "correct"  # per candidate head, the client's hold-out images it predicts right
HOLDOUT_SEED, HOLDOUT_FRACTION = "holdout-seed", "holdout-fraction"  # request entries that draw the hold-outs
CANDIDATES = "candidates"  # request entry: the candidate heads, flattened (K x classes x width)


def feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> TensorDict:
    """``G = H^T H`` and ``C = H^T Y`` (``Y`` one-hot over ``num_classes``) in float64."""
    features = features.to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
    return {"G": features.T @ features, "C": features.T @ onehot}


def feature_moments(features: torch.Tensor) -> TensorDict:
    """``S = sum_i h_i`` and ``Q = sum_i h_i^2`` per feature, in float64."""
    features = features.to(torch.float64)
    return {"S": features.sum(dim=0), "Q": features.square().sum(dim=0)}


def standardiser(moments: TensorDict, count: int) -> TensorDict:
    """``shift = mu = S / n`` and ``scale = 1 / sigma`` with ``sigma^2 = Q / n - mu^2``; a feature of
    (numerically) zero variance keeps scale 1. No data: the identity."""
    if count <= 0:
        return {STANDARDISER[0]: torch.zeros_like(moments["S"]), STANDARDISER[1]: torch.ones_like(moments["S"])}
    mean = moments["S"] / count
    variance = (moments["Q"] / count - mean.square()).clamp_min(0.0)
    varies = variance > 1e-12 * float(variance.max())
    return {STANDARDISER[0]: mean, STANDARDISER[1]: torch.where(varies, variance.rsqrt(), 1.0)}


def ridge_head(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> TensorDict:
    """The head of ``W = (G + eps I)^-1 C``: ``weight = W^T``, ``bias = 0`` (float64).

    An all-zero ``G`` (no data yet) gives an all-zero head, never NaN.
    """
    weight = merge_with_grams(cross.T, gram, ridge)
    return head_of(weight)


def head_of(weight: torch.Tensor) -> TensorDict:
    return {"head.weight": weight, "head.bias": torch.zeros(weight.shape[0], dtype=torch.float64)}


def gcv_scores(eigenvalues: torch.Tensor, energies: torch.Tensor, count: float, absolute: list[float]) -> list[float]:
    """Generalised cross-validation ``RSS(eps) / (n - dof(eps))^2`` per absolute ridge ``eps``.

    With ``G = V diag(e) V^T`` and ``p_i = ||(V^T C)_i||^2``: ``RSS = n - sum_i p_i (e_i + 2 eps) / (e_i + eps)^2``
    (``n`` the sum of the squared one-hot targets) and ``dof = sum_i e_i / (e_i + eps)``: sums only, no
    per-sample residual. ``inf`` where ``dof >= n``.
    """
    scores = []
    for eps in absolute:
        denominator = eigenvalues + eps
        rss = count - float((energies * (eigenvalues + 2 * eps) / denominator.square()).sum())
        spare = count - float((eigenvalues / denominator).sum())
        scores.append(max(rss, 0.0) / spare**2 if spare > 0 else math.inf)
    return scores


class RidgePath:
    """``W(ridge) = (G + eps I)^-1 C`` for any relative ridge from one eigendecomposition ``G = V diag(e) V^T`` (float64)."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor) -> None:
        self.gram = gram.to(torch.float64)
        eigenvalues, self.vectors = torch.linalg.eigh(self.gram)
        self.eigenvalues = eigenvalues.clamp_min(0.0)
        self.projected = self.vectors.T @ cross.to(torch.float64)

    def weight(self, ridge: float) -> torch.Tensor:
        """``W^T`` (classes x width) at the relative ``ridge``; zero where ``G + eps I`` has a zero eigenvalue."""
        denominator = self.eigenvalues + ridge_of(self.gram, ridge)
        return (self.vectors @ (self.projected / denominator.where(denominator > 0, math.inf)[:, None])).T

    def gcv(self, count: float, grid: Sequence[float]) -> list[float]:
        """The GCV score of each relative ridge of ``grid`` (:func:`gcv_scores`)."""
        return gcv_scores(self.eigenvalues, self.projected.square().sum(dim=1), count, [ridge_of(self.gram, r) for r in grid])


def gcv_ridge(gram: torch.Tensor, cross: torch.Tensor, count: float, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[float, TensorDict]:
    """The relative ridge of ``grid`` with the smallest GCV score and its head (float64); one eigendecomposition of ``G``.

    No data yet (an all-zero ``G``): the grid's first ridge and an all-zero head.
    """
    if count <= 0 or not bool(gram.any()):
        return grid[0], head_of(torch.zeros(cross.shape[1], cross.shape[0], dtype=torch.float64))
    path = RidgePath(gram, cross)
    scores = path.gcv(count, grid)
    best = min(range(len(grid)), key=scores.__getitem__)
    return grid[best], head_of(path.weight(grid[best]))


def holdout_size(count: int, fraction: float) -> int:
    """How many of a client's ``count`` current-task images it holds out: ``floor(fraction x count)``, at least one
    when it has two or more, none with fewer."""
    return 0 if count < 2 else max(1, int(fraction * count))


def holdout_mask(labels: torch.Tensor, fraction: float, seed: int, task: int) -> torch.Tensor:
    """Which of a client's current-task images (labels in the order it computes features) are its hold-out.

    :func:`holdout_size` images, drawn from the run's ``seed``, the ``task`` and the client's own labels, so every
    exchange of a task draws the same ones (a client keeps nothing between requests).
    """
    own = int.from_bytes(hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).digest()[:8], "little")
    order = np.random.default_rng([seed, task, own]).permutation(len(labels))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.as_tensor(order[:holdout_size(len(labels), fraction)], dtype=torch.long)] = True
    return mask


def correct_per_head(features: torch.Tensor, labels: torch.Tensor, heads: torch.Tensor, seen: int) -> torch.Tensor:
    """Per head (``K x classes x width``), how many of ``features``' images it predicts right among the first ``seen``
    classes (as the evaluation predicts: every class seen so far), in float64."""
    logits = torch.einsum("nd,kcd->knc", features.to(torch.float64), heads[:, :seen].to(torch.float64))
    return (logits.argmax(dim=2) == labels.to(logits.device)).sum(dim=1).to(torch.float64)


def most_correct(ridges: Sequence[float], correct: torch.Tensor) -> float:
    """The ridge with the most correct hold-out predictions; ties go to the larger ridge."""
    return max(zip(correct.tolist(), ridges))[1]


class Analytic(FederatedStrategy):
    """Accumulate every task's ``Z^T Z``, ``Z^T Y`` and count over clients; the head solves ridge regression.

    The feature map is part of the model (``method.blocks`` and ``method.projection_dim``), so
    the head's width is already the features'. With a standardiser in ``initial_state``
    (``standardise.shift``, ``standardise.scale``) task 0's rounds ask for the moments and its
    end-of-task exchange for the sums. With ``ridge = validation`` a task's sums rounds also ask
    for the sums outside each client's hold-out and its end-of-task exchange for the hold-out
    counts of the candidate heads (module docstring).

    Parameters
    ----------
    initial_state : the trainable state the run starts from (only the head's and standardiser's shapes matter).
    ridge : relative ridge of the solve, ``eps = ridge * mean(diag(G))``, or ``gcv`` (chosen per solve from the sums),
        or ``validation`` (chosen on the clients' hold-outs).
    holdout : the fraction of its current-task images each client holds out (``validation`` only).
    seed : the run's seed, which (with the task and each client's labels) draws the hold-outs.
    """

    trains_masked_head = False
    secure_sum = "sum"

    def __init__(self, initial_state: TensorDict, ridge: float | str = 1e-3, holdout: float = 0.1, seed: int = 0) -> None:
        self.standardises = STANDARDISER[0] in initial_state
        kept = ("head.weight", "head.bias", *(STANDARDISER if self.standardises else ()))
        super().__init__({k: initial_state[k] for k in kept})
        self.ridge, self.holdout, self.seed = ridge, holdout, seed
        self.chosen: float | None = None  # the relative ridge of the current head
        self.holdout_correct: list[float] | None = None  # per candidate of VALIDATION_GRID, when the hold-outs chose it
        classes, width = initial_state["head.weight"].shape
        zero = {"G": torch.zeros(width, width, dtype=torch.float64), "C": torch.zeros(width, classes, dtype=torch.float64),
                "n": torch.zeros((), dtype=torch.float64)}
        self.finished = dict(zero)  # sums over the tasks before the current one
        self.current = dict(zero)  # the current task's sums (its latest round)
        self.fit: TensorDict = {}  # with validation: the current task's sums outside the hold-outs (its latest round)

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> Analytic:
        ridge = cfg.method.ridge  # checked by fedcil.settings: gcv, validation or a number >= 0
        return cls(initial_state, ridge if ridge in (GCV, VALIDATION) else float(ridge), float(cfg.method.holdout),
                   int(cfg.seed))

    def measures_moments(self, task: int) -> bool:
        """Whether ``task``'s rounds ask for the moments (the first task, with a standardiser)."""
        return self.standardises and task == 0

    def validates(self, task: int) -> bool:
        """Whether ``task``'s end-of-task exchange scores candidate heads on the hold-outs (not after the moments)."""
        return self.ridge == VALIDATION and not self.measures_moments(task)

    def plan(self, extra: Mapping[str, Any]) -> RoundPlan:
        """A statistics request under the fixed standardiser (if any)."""
        return RoundPlan(state={k: self.state[k] for k in STANDARDISER if k in self.state}, train_groups=(), extra=dict(extra))

    def holdout_entries(self) -> dict[str, Any]:
        """What a request tells the clients to draw their hold-outs (:func:`holdout_mask`)."""
        return {HOLDOUT_SEED: self.seed, HOLDOUT_FRACTION: self.holdout}

    def start_task(self, task: int) -> None:
        self.finished = {key: self.finished[key] + self.current[key] for key in SUMS}
        self.current = {key: torch.zeros_like(value) for key, value in self.finished.items()}

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        if self.measures_moments(task):
            return RoundPlan(state={}, train_groups=(), extra={"statistics": MOMENTS})
        return self.plan({"statistics": STATISTICS, **(self.holdout_entries() if self.validates(task) else {})})

    def task_end_plan(self, task: int) -> RoundPlan | None:
        if self.measures_moments(task):
            return self.plan({"statistics": STATISTICS})
        if not self.validates(task):
            return None
        path = RidgePath(self.finished["G"] + self.fit["G"], self.finished["C"] + self.fit["C"])
        heads = torch.stack([path.weight(ridge) for ridge in VALIDATION_GRID])
        return self.plan({"statistics": SCORES, **self.holdout_entries(), CANDIDATES: heads.flatten().tolist()})

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        kind = plan.extra.get("statistics")
        if kind == STATISTICS:
            shapes = {key: tuple(self.finished[key].shape) for key in ("G", "C")}
            return shapes | ({f"fit.{k}": s for k, s in shapes.items()} if HOLDOUT_SEED in plan.extra else {})
        if kind == SCORES:
            return {CORRECT: (len(VALIDATION_GRID),)}
        if kind == MOMENTS and self.standardises:
            return {key: tuple(self.state[STANDARDISER[0]].shape) for key in MOMENT_SUMS}
        return super().expected_reply(plan, task)

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """``G_k`` weighs ``C_k`` (the client's own solution is ``G_k^-1 C_k``); ``C_k = Z_k^T Y_k`` has one-hot targets;
        the same for the fit part. The moments ``S_k``, ``Q_k`` and the hold-out counts grow with ``n_k``."""
        kind = plan.extra.get("statistics")
        if kind == STATISTICS:
            fit = HOLDOUT_SEED in plan.extra
            return WeightedSums({"G": ("C",), **({FIT[0]: (FIT[1],)} if fit else {})},
                                unit_targets={"C": "G", **({FIT[1]: FIT[0]} if fit else {})})
        if kind == MOMENTS:
            return WeightedSums(per_example=MOMENT_SUMS)
        if kind == SCORES:
            return WeightedSums(per_example=(CORRECT,))
        return WeightedSums()

    @classmethod
    def client_reply(cls, method: Mapping[str, Any], client: ClientRound) -> TensorDict:
        """The moments of the client's current-task features before the standardiser; or ``G_k``, ``C_k`` of what the
        head sees (and of its images outside the hold-out, when asked); or each candidate head's right predictions on
        the hold-out (float64)."""
        extra = client.request.extra
        if extra.get("statistics") == MOMENTS:
            features, _ = client.head_features(True)
            return feature_moments(features)
        features, labels = client.head_features(False)
        classes, width = client.trained["head.weight"].shape
        held = (holdout_mask(labels, float(extra[HOLDOUT_FRACTION]), int(extra[HOLDOUT_SEED]), client.request.task)
                if HOLDOUT_SEED in extra else torch.zeros(len(labels), dtype=torch.bool))
        if extra.get("statistics") == SCORES:
            heads = torch.tensor(extra[CANDIDATES], dtype=torch.float64).reshape(-1, classes, width)
            return {CORRECT: correct_per_head(features[held], labels[held], heads, client.task_classes.stop)}
        sums = feature_sums(features, labels, classes)
        if HOLDOUT_SEED in extra:
            fit = feature_sums(features[~held], labels[~held], classes)
            sums |= {FIT[0]: fit["G"], FIT[1]: fit["C"]}
        return sums

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        if self.measures_moments(task):
            moments = sum_updates(updates, list(MOMENT_SUMS))
            fixed = standardiser(moments, sum(u.num_examples for u in updates))
            self.state.update({key: value.to(self.state[key].dtype) for key, value in fixed.items()})
        else:
            self.solve(updates)

    def end_task(self, task: int, updates: list[ClientUpdate]) -> None:
        if self.measures_moments(task):
            self.solve(updates)
        elif self.validates(task):
            correct = sum((self.bounded_correct(u) for u in updates), torch.zeros(len(VALIDATION_GRID), dtype=torch.float64))
            if sum(self.holdout_bound(u) for u in updates) > 0:  # else no hold-out image: the GCV head of the round stays
                ridge = most_correct(VALIDATION_GRID, correct)
                gram, cross = (self.finished[key] + self.current[key] for key in ("G", "C"))
                self.use_head(ridge, ridge_head(gram, cross, ridge))
                self.holdout_correct = correct.tolist()

    def holdout_bound(self, update: ClientUpdate) -> int:
        """The most hold-out images ``update`` can hold: :func:`holdout_size` of its count, or for a secure sum of
        ``clients`` replies ``floor(holdout x n) + clients`` (each client rounds up by less than one), at most ``n``."""
        n = update.num_examples
        return holdout_size(n, self.holdout) if update.clients == 1 else min(n, int(self.holdout * n) + update.clients)

    def bounded_correct(self, update: ClientUpdate) -> torch.Tensor:
        """``update``'s counts of right predictions, each within ``0..holdout_bound`` (a NaN counts none): a client
        moves the choice by at most its own hold-out."""
        counts = update.tensors[CORRECT].to(torch.float64).nan_to_num(0.0)
        return counts.clamp(0.0, float(self.holdout_bound(update)))

    def solve(self, updates: list[ClientUpdate]) -> None:
        """The current task's sums from ``updates`` (and their fit sums, when sent); the head from every task's."""
        self.current = {**sum_updates(updates, ["G", "C"]),
                        "n": torch.tensor(float(sum(u.num_examples for u in updates)), dtype=torch.float64)}
        fit = sum_updates(updates, list(FIT)) if FIT[0] in updates[0].tensors else {}
        self.fit = {key.removeprefix("fit."): value for key, value in fit.items()}
        self.holdout_correct = None
        gram, cross, count = (self.finished[key] + self.current[key] for key in SUMS)
        if self.ridge in (GCV, VALIDATION):  # validation: until the hold-outs' counts arrive
            self.use_head(*gcv_ridge(gram, cross, float(count)))
        else:
            self.use_head(float(self.ridge), ridge_head(gram, cross, float(self.ridge)))

    def use_head(self, ridge: float, head: TensorDict) -> None:
        """Make ``head``, solved at the relative ``ridge``, the current one."""
        self.chosen = ridge
        self.state.update({key: value.to(self.state[key].dtype) for key, value in head.items()})

    def record(self) -> dict:
        """The relative ridge of the current head (``ridge``) and, with validation, per candidate ridge the right
        hold-out predictions that chose it (``holdout_correct``; null where GCV chose), for ``results.json``."""
        return {"ridge": self.chosen, **({"holdout_correct": self.holdout_correct} if self.ridge == VALIDATION else {})}

    def checkpoint(self) -> tuple[TensorDict, dict]:
        tensors, values = super().checkpoint()
        for key in SUMS:
            tensors[f"finished/{key}"], tensors[f"current/{key}"] = self.finished[key], self.current[key]
        return tensors, values | {"ridge": self.chosen, "holdout_correct": self.holdout_correct}

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.finished = {key: tensors[f"finished/{key}"] for key in SUMS}
        self.current = {key: tensors[f"current/{key}"] for key in SUMS}
        self.chosen, self.holdout_correct = values.get("ridge"), values.get("holdout_correct")
