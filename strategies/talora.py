"""Fed-TaLoRA (Yu, Hu, Min, arXiv 2505.12318): one task-agnostic adapter with the residual
weight update (ResWU).

One adapter on the lower blocks (``lora.blocks``, ``lora.targets``) is trained on through
every task and never re-initialised. After every round (``p_k`` sample shares, ``s`` the
LoRA scaling)::

    B <- B̄,  A <- Ā,  head <- sum_k p_k head_k,  W0 <- W0 + s (sum_k p_k B_k A_k - B̄ Ā)

``use_reswu: false`` drops the residual (task-agnostic FedAvg-LoRA, the paper's ablation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcil.protocol import TensorDict
from fedcil.tasks import TaskSplit
from strategies.base import lora_scaling
from strategies.fedex_lora import FedExLoRA

if TYPE_CHECKING:
    from omegaconf import DictConfig


class FedTaLoRA(FedExLoRA):
    """FedEx-LoRA's exact residual on a single adapter kept across tasks (``method.use_reswu``)."""

    fresh_adapter_per_task = False

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> FedTaLoRA:
        return cls(initial_state, scaling=lora_scaling(cfg.lora), seed=int(cfg.seed), use_residual=bool(cfg.method.use_reswu))
