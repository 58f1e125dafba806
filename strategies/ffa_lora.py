"""FFA-LoRA (Sun et al., "Improving LoRA in privacy-preserving federated learning", ICLR 2024).

A stays frozen at its seeded random initialisation; clients train only B and the head,
and the server averages them by sample share::

    B <- sum_k p_k B_k,   head <- sum_k p_k head_k

With A shared, ``sum_k p_k B_k A = (sum_k p_k B_k) A``: the aggregation is exact, and a
client uploads half the adapter.
"""

from __future__ import annotations

from strategies.fedavg_lora import FedAvgLoRA


class FFALoRA(FedAvgLoRA):
    """FedAvg-LoRA's averaging with only B and the head trained; A never moves."""

    train_groups = ("lora_B", "head")
