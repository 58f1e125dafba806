"""Analytic classifier: federated closed-form ridge regression on frozen features
(RanPAC, McDonnell et al., NeurIPS 2023; federated as in AFCL and FedRAN).

No gradient step anywhere. For task ``t`` every client ``k`` sends the sums of its
current-task data, with ``H_k`` what the head sees (the frozen backbone's features, or
``ReLU(R h)`` for a fixed seeded random ``R`` when ``method.projection_dim = M > 0``) and
``Y_k`` the one-hot labels over every class::

    G_k = H_k^T H_k,    C_k = H_k^T Y_k

The server keeps ``G = sum_{t,k} G_k`` and ``C = sum_{t,k} C_k`` over clients and tasks and
sets the head to::

    W = (G + eps I)^-1 C   (head.weight = W^T, head.bias = 0),   eps = ridge * mean(diag(G))

in float64: exactly centralised ridge regression on the union of every client's data of
every task seen, whatever the partition, the client order and the task order. Sums only,
so the merge suits secure aggregation. One round per task is enough: a task's later
rounds recompute the same sums (with ``fraction_train < 1`` the task's last round's
clients count). The adapters are never used (``B = 0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedcil.closed_form import merge_with_grams
from fedcil.protocol import ClientUpdate, RoundPlan, Shapes, TensorDict, WeightedSums
from fedcil.tasks import TaskSplit
from strategies.aggregation import sum_updates
from strategies.base import ClientRound, FederatedStrategy

if TYPE_CHECKING:
    from omegaconf import DictConfig

STATISTICS = "analytic"
SUMS = ("G", "C")  # H^T H and H^T Y


def feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> TensorDict:
    """``G = H^T H`` and ``C = H^T Y`` (``Y`` one-hot over ``num_classes``) in float64."""
    features = features.to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
    return {"G": features.T @ features, "C": features.T @ onehot}


def ridge_head(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> TensorDict:
    """The head of ``W = (G + eps I)^-1 C``: ``weight = W^T``, ``bias = 0`` (float64).

    An all-zero ``G`` (no data yet) gives an all-zero head, never NaN.
    """
    weight = merge_with_grams(cross.T, gram, ridge)
    return {"head.weight": weight, "head.bias": torch.zeros(weight.shape[0], dtype=torch.float64)}


class Analytic(FederatedStrategy):
    """Accumulate every task's ``H^T H`` and ``H^T Y`` over clients; the head solves ridge regression.

    The random feature map, if any, is part of the model (``model.projection_dim`` follows
    ``method.projection_dim``), so the head's width is already ``M``.

    Parameters
    ----------
    initial_state : the trainable state the run starts from (only the head's shapes matter).
    ridge : relative ridge of the solve, ``eps = ridge * mean(diag(G))``.
    """

    trains_masked_head = False
    secure_sum = "sum"

    def __init__(self, initial_state: TensorDict, ridge: float = 1e-3) -> None:
        super().__init__({k: initial_state[k] for k in ("head.weight", "head.bias")})
        self.ridge = ridge
        classes, width = initial_state["head.weight"].shape
        zero = {"G": torch.zeros(width, width, dtype=torch.float64), "C": torch.zeros(width, classes, dtype=torch.float64)}
        self.finished = dict(zero)  # sums over the tasks before the current one
        self.current = dict(zero)  # the current task's sums (its latest round)

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> Analytic:
        return cls(initial_state, float(cfg.method.ridge))

    def start_task(self, task: int) -> None:
        self.finished = {key: self.finished[key] + self.current[key] for key in SUMS}
        self.current = {key: torch.zeros_like(value) for key, value in self.finished.items()}

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        return RoundPlan(state={}, train_groups=(), extra={"statistics": STATISTICS})

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        if plan.extra.get("statistics") == STATISTICS:
            return {key: tuple(self.finished[key].shape) for key in SUMS}
        return super().expected_reply(plan, task)

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """``G_k`` weighs ``C_k`` (the client's own solution is ``G_k^-1 C_k``); ``C_k = H_k^T Y_k`` has one-hot targets."""
        if plan.extra.get("statistics") != STATISTICS:
            return WeightedSums()
        return WeightedSums({"G": ("C",)}, unit_targets={"C": "G"})

    @classmethod
    def client_reply(cls, method: Mapping[str, Any], client: ClientRound) -> TensorDict:
        """``G_k`` and ``C_k`` of the client's current-task data, in float64."""
        features, labels = client.head_features()
        return feature_sums(features, labels, client.trained["head.weight"].shape[0])

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        self.current = sum_updates(updates, list(SUMS))
        gram, cross = (self.finished[key] + self.current[key] for key in SUMS)
        head = ridge_head(gram, cross, self.ridge)
        self.state = {key: value.to(self.state[key].dtype) for key, value in head.items()}

    def checkpoint(self) -> tuple[TensorDict, dict]:
        tensors, values = super().checkpoint()
        for key in SUMS:
            tensors[f"finished/{key}"], tensors[f"current/{key}"] = self.finished[key], self.current[key]
        return tensors, values

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.finished = {key: tensors[f"finished/{key}"] for key in SUMS}
        self.current = {key: tensors[f"current/{key}"] for key in SUMS}
