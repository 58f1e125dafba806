"""Federated methods, one module each, chosen by ``method.name``."""

from __future__ import annotations

from omegaconf import DictConfig

from fedcil.errors import ConfigError
from fedcil.registry import Registry
from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from strategies.base import FederatedStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fedex_lora import FedExLoRA
from strategies.ffa_lora import FFALoRA
from strategies.lorm import LoRM
from strategies.talora import FedTaLoRA

METHODS: Registry = Registry("method")
METHODS.register("fedavg_lora")(FedAvgLoRA)
METHODS.register("lorm")(LoRM)
METHODS.register("ffa_lora")(FFALoRA)
METHODS.register("fedex_lora")(FedExLoRA)
METHODS.register("talora")(FedTaLoRA)


CENTRALISED = ("joint",)


def build_strategy(cfg: DictConfig, initial_state: TensorDict) -> FederatedStrategy:
    """The strategy named by ``cfg.method.name``, starting from ``initial_state``."""
    if cfg.method.name in CENTRALISED:
        raise ConfigError(f"method={cfg.method.name} trains centrally without Flower: run it with fcil-run or fcil-sweep")
    return METHODS.get(cfg.method.name)(cfg, initial_state)


__all__ = ["METHODS", "ClientUpdate", "FederatedStrategy", "RoundPlan", "build_strategy"]
