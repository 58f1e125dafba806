"""FedAvg-LoRA (FedIT; Zhang et al., "Towards building the federated GPT", ICASSP 2024).

One adapter is trained on through all tasks. After every round the server averages each
factor and the head separately, weighted by sample share ``p_k = n_k / sum_j n_j``::

    A <- sum_k p_k A_k,    B <- sum_k p_k B_k,    head <- sum_k p_k head_k

Note that ``(sum_k p_k B_k)(sum_k p_k A_k) != sum_k p_k B_k A_k`` in general: this
aggregation is inexact, which is what FedEx-LoRA, Fed-TaLoRA and LoRM correct.
"""

from __future__ import annotations

from fedcil.protocol import ClientUpdate, RoundPlan
from strategies.aggregation import average_updates
from strategies.base import FederatedStrategy


class FedAvgLoRA(FederatedStrategy):
    """Average A, B and the head separately by sample share, every round."""

    train_groups = ("lora_A", "lora_B", "head")
    secure_sum = "mean"

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        return RoundPlan(state=self.state, train_groups=self.train_groups)

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        averages = average_updates(updates, list(updates[0].tensors))
        self.state.update({key: value.to(self.state[key].dtype) for key, value in averages.items()})
