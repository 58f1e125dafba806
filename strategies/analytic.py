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
round's entry of ``results.json``. Sums only, so the merge suits secure aggregation. One
round per task is enough: a task's later rounds recompute the same sums (with
``fraction_train < 1`` the task's last round's clients count). The adapters are never used
(``B = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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


def gcv_ridge(gram: torch.Tensor, cross: torch.Tensor, count: float, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[float, TensorDict]:
    """The relative ridge of ``grid`` with the smallest GCV score and its head (float64); one eigendecomposition of ``G``.

    No data yet (an all-zero ``G``): the grid's first ridge and an all-zero head.
    """
    gram, cross = gram.to(torch.float64), cross.to(torch.float64)
    if count <= 0 or not bool(gram.any()):
        return grid[0], head_of(torch.zeros(cross.shape[1], cross.shape[0], dtype=torch.float64))
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(0.0)
    projected = vectors.T @ cross
    scores = gcv_scores(eigenvalues, projected.square().sum(dim=1), count, [ridge_of(gram, r) for r in grid])
    best = min(range(len(grid)), key=scores.__getitem__)
    weight = vectors @ (projected / (eigenvalues + ridge_of(gram, grid[best]))[:, None])
    return grid[best], head_of(weight.T)


class Analytic(FederatedStrategy):
    """Accumulate every task's ``Z^T Z``, ``Z^T Y`` and count over clients; the head solves ridge regression.

    The feature map is part of the model (``method.blocks`` and ``method.projection_dim``), so
    the head's width is already the features'. With a standardiser in ``initial_state``
    (``standardise.shift``, ``standardise.scale``) task 0's rounds ask for the moments and its
    end-of-task exchange for the sums.

    Parameters
    ----------
    initial_state : the trainable state the run starts from (only the head's and standardiser's shapes matter).
    ridge : relative ridge of the solve, ``eps = ridge * mean(diag(G))``, or ``gcv`` (chosen per solve).
    """

    trains_masked_head = False
    secure_sum = "sum"

    def __init__(self, initial_state: TensorDict, ridge: float | str = 1e-3) -> None:
        self.standardises = STANDARDISER[0] in initial_state
        kept = ("head.weight", "head.bias", *(STANDARDISER if self.standardises else ()))
        super().__init__({k: initial_state[k] for k in kept})
        self.ridge = ridge
        self.chosen: float | None = None  # the relative ridge of the current head
        classes, width = initial_state["head.weight"].shape
        zero = {"G": torch.zeros(width, width, dtype=torch.float64), "C": torch.zeros(width, classes, dtype=torch.float64),
                "n": torch.zeros((), dtype=torch.float64)}
        self.finished = dict(zero)  # sums over the tasks before the current one
        self.current = dict(zero)  # the current task's sums (its latest round)

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> Analytic:
        ridge = cfg.method.ridge  # checked by fedcil.settings: gcv or a number >= 0
        return cls(initial_state, ridge if ridge == "gcv" else float(ridge))

    def measures_moments(self, task: int) -> bool:
        """Whether ``task``'s rounds ask for the moments (the first task, with a standardiser)."""
        return self.standardises and task == 0

    def sums_plan(self) -> RoundPlan:
        """The request for ``G_k``, ``C_k`` under the fixed standardiser (if any)."""
        return RoundPlan(state={k: self.state[k] for k in STANDARDISER if k in self.state}, train_groups=(),
                         extra={"statistics": STATISTICS})

    def start_task(self, task: int) -> None:
        self.finished = {key: self.finished[key] + self.current[key] for key in SUMS}
        self.current = {key: torch.zeros_like(value) for key, value in self.finished.items()}

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        if self.measures_moments(task):
            return RoundPlan(state={}, train_groups=(), extra={"statistics": MOMENTS})
        return self.sums_plan()

    def task_end_plan(self, task: int) -> RoundPlan | None:
        return self.sums_plan() if self.measures_moments(task) else None

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        kind = plan.extra.get("statistics")
        if kind == STATISTICS:
            return {key: tuple(self.finished[key].shape) for key in ("G", "C")}
        if kind == MOMENTS and self.standardises:
            return {key: tuple(self.state[STANDARDISER[0]].shape) for key in MOMENT_SUMS}
        return super().expected_reply(plan, task)

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """``G_k`` weighs ``C_k`` (the client's own solution is ``G_k^-1 C_k``); ``C_k = Z_k^T Y_k`` has one-hot targets.
        The moments ``S_k``, ``Q_k`` are ``n_k`` times the client's means."""
        kind = plan.extra.get("statistics")
        if kind == STATISTICS:
            return WeightedSums({"G": ("C",)}, unit_targets={"C": "G"})
        if kind == MOMENTS:
            return WeightedSums(per_example=MOMENT_SUMS)
        return WeightedSums()

    @classmethod
    def client_reply(cls, method: Mapping[str, Any], client: ClientRound) -> TensorDict:
        """The moments of the client's current-task features before the standardiser, or ``G_k``, ``C_k`` of
        what the head sees (float64)."""
        if client.request.extra.get("statistics") == MOMENTS:
            features, _ = client.head_features(True)
            return feature_moments(features)
        features, labels = client.head_features(False)
        return feature_sums(features, labels, client.trained["head.weight"].shape[0])

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

    def solve(self, updates: list[ClientUpdate]) -> None:
        """The current task's sums from ``updates``; the head from every task's."""
        self.current = {**sum_updates(updates, ["G", "C"]),
                        "n": torch.tensor(float(sum(u.num_examples for u in updates)), dtype=torch.float64)}
        gram, cross, count = (self.finished[key] + self.current[key] for key in SUMS)
        if self.ridge == "gcv":
            self.chosen, head = gcv_ridge(gram, cross, float(count))
        else:
            self.chosen, head = float(self.ridge), ridge_head(gram, cross, float(self.ridge))
        self.state.update({key: value.to(self.state[key].dtype) for key, value in head.items()})

    def record(self) -> dict:
        """The relative ridge of the current head (``ridge``), for the round's entry of ``results.json``."""
        return {"ridge": self.chosen}

    def checkpoint(self) -> tuple[TensorDict, dict]:
        tensors, values = super().checkpoint()
        for key in SUMS:
            tensors[f"finished/{key}"], tensors[f"current/{key}"] = self.finished[key], self.current[key]
        return tensors, values | {"ridge": self.chosen}

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.finished = {key: tensors[f"finished/{key}"] for key in SUMS}
        self.current = {key: tensors[f"current/{key}"] for key in SUMS}
        self.chosen = values.get("ridge")
