"""Federated methods, one module each, chosen by ``method.name``.

Importing this package needs torch (and Flower's record types) but not timm, PEFT or Hydra:
strategies work on named tensors only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from fedcil.registry import Registry
from fedcil.tasks import TaskSplit
from strategies.base import ClientRound, FederatedStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fedex_lora import FedExLoRA
from strategies.ffa_lora import FFALoRA
from strategies.lorm import LoRM
from strategies.talora import FedTaLoRA

if TYPE_CHECKING:
    from omegaconf import DictConfig

METHODS: Registry[type[FederatedStrategy]] = Registry("method")
METHODS.register("fedavg_lora")(FedAvgLoRA)
METHODS.register("lorm")(LoRM)
METHODS.register("ffa_lora")(FFALoRA)
METHODS.register("fedex_lora")(FedExLoRA)
METHODS.register("talora")(FedTaLoRA)


CENTRALISED = ("joint",)


def method_class(name: str) -> type[FederatedStrategy]:
    """The strategy class registered as ``name`` (one line listing the valid names otherwise)."""
    if name in CENTRALISED:
        raise ConfigError(f"method={name} trains centrally without Flower: run it with fcil-run or fcil-sweep")
    return METHODS.get(name)


def build_strategy(cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> FederatedStrategy:
    """The strategy named by ``cfg.method.name`` for a run with task split ``split``, starting from ``initial_state``."""
    return method_class(cfg.method.name).from_config(cfg, split, initial_state)


__all__ = ["METHODS", "ClientRound", "ClientUpdate", "FederatedStrategy", "RoundPlan", "build_strategy", "method_class"]
