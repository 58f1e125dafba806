"""Head only: the floor every adapter method must beat (what does LoRA add?).

The backbone stays frozen and no adapter is trained or exchanged. Clients train the head
with the masked cross-entropy over their current task's classes, and the server averages
the head by sample share ``p_k = n_k / sum_j n_j`` after every round::

    head <- sum_k p_k head_k

Requests and replies carry the head only (the adapters keep their initial ``B = 0``).
"""

from __future__ import annotations

from fedcil.protocol import TensorDict, param_group
from strategies.fedavg_lora import FedAvgLoRA


class HeadOnly(FedAvgLoRA):
    """FedAvg of the linear head on the frozen backbone."""

    train_groups = ("head",)

    def __init__(self, initial_state: TensorDict) -> None:
        super().__init__({k: v for k, v in initial_state.items() if param_group(k) == "head"})
