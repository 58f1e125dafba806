"""FFA-LoRA (Sun et al., "Improving LoRA in privacy-preserving federated learning", ICLR 2024).

A stays frozen at its seeded random initialisation; clients train only B and the head,
and the server averages them by sample share::

    B <- sum_k p_k B_k,   head <- sum_k p_k head_k

With A shared, ``sum_k p_k B_k A = (sum_k p_k B_k) A``: the aggregation is exact, and a
client uploads half the adapter.
"""

from __future__ import annotations

from fedcil.protocol import ClientUpdate, RoundPlan
from strategies.aggregation import average_updates
from strategies.base import FederatedStrategy


class FFALoRA(FederatedStrategy):
    """Train and average B and the head; A never moves."""

    train_groups = ("lora_B", "head")

    def configure_round(self, task: int, server_round: int) -> RoundPlan:
        return RoundPlan(state=self.state, train_groups=self.train_groups)

    def aggregate_round(self, task: int, server_round: int, updates: list[ClientUpdate]) -> None:
        self.state.update(average_updates(updates, list(updates[0].tensors)))
