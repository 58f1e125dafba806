"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact aggregation for federated and efficient
fine-tuning of foundation models", 2025): average the factors, fold the residual into the base.

Every round, with sample shares ``p_k`` and LoRA scaling ``s``::

    B <- B̄ = sum_k p_k B_k,   A <- Ā = sum_k p_k A_k,   head <- sum_k p_k head_k
    W0 <- W0 + s (sum_k p_k B_k A_k - B̄ Ā)

so the global model equals the average of the clients' models exactly. In class-incremental
use every task starts a fresh adapter (B = 0, A kaiming-uniform); the finished task's
adapter ``s B̄ Ā`` is folded into the base first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from fedcil.tasks import TaskSplit
from strategies.aggregation import average_updates, fresh_adapter, sample_shares
from strategies.base import FederatedStrategy, lora_scaling
from strategies.residual import ResidualBase, residual_factors

if TYPE_CHECKING:
    from omegaconf import DictConfig


class FedExLoRA(FederatedStrategy):
    """Factor averaging plus the exact residual in the base; a fresh adapter per task.

    Parameters
    ----------
    initial_state : the trainable state the run starts from.
    scaling : the LoRA scaling ``s = alpha / rank``.
    seed : seeds each task's fresh adapter (with the task index).
    use_residual : fold the residual into the base (exact aggregation); off, this is
        FedAvg-LoRA with a fresh adapter per task.
    """

    fresh_adapter_per_task = True

    def __init__(self, initial_state: TensorDict, scaling: float, seed: int, use_residual: bool = True) -> None:
        super().__init__(initial_state)
        self.scaling, self.seed, self.use_residual = scaling, seed, use_residual
        self.layers = sorted(k.removesuffix(".lora_A") for k in initial_state if k.endswith(".lora_A"))
        self.residual = ResidualBase()

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> FedExLoRA:
        return cls(initial_state, scaling=lora_scaling(cfg.lora), seed=int(cfg.seed))

    def start_task(self, task: int) -> None:
        if not self.fresh_adapter_per_task:
            return
        if task > 0:
            for layer in self.layers:
                B, A = self.state[f"{layer}.lora_B"].double(), self.state[f"{layer}.lora_A"].double()
                self.residual.add(layer, self.scaling * B, A)
        self.state = fresh_adapter(self.state, self.seed, task)

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        return RoundPlan(state=self.state, train_groups=("lora_A", "lora_B", "head"), base=self.residual.message())

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        if self.use_residual:
            shares = sample_shares(updates)
            for layer in self.layers:
                Bs = [u.tensors[f"{layer}.lora_B"] for u in updates]
                As = [u.tensors[f"{layer}.lora_A"] for u in updates]
                self.residual.add(layer, *residual_factors(Bs, As, shares, self.scaling))
        self.state.update(average_updates(updates, list(updates[0].tensors)))

    def base_deltas(self) -> TensorDict:
        return self.residual.deltas()

    def checkpoint(self) -> tuple[TensorDict, dict]:
        tensors, values = super().checkpoint()
        return {**tensors, **self.residual.to_tensors("residual/")}, values

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.residual = ResidualBase.from_tensors(tensors, "residual/")
