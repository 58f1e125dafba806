"""Federated methods, one module each, chosen by ``method.name``."""

from __future__ import annotations

from omegaconf import DictConfig

from fedcil.errors import ConfigError
from fedcil.registry import Registry
from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from strategies.base import FederatedStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.lorm import LoRM

METHODS: Registry = Registry("method")
METHODS.register("fedavg_lora")(FedAvgLoRA)
METHODS.register("lorm")(LoRM)


CENTRALISED = ("joint",)


def build_strategy(cfg: DictConfig, initial_state: TensorDict) -> FederatedStrategy:
    """The strategy named by ``cfg.method.name``, starting from ``initial_state``."""
    if cfg.method.name in CENTRALISED:
        raise ConfigError(f"method={cfg.method.name} trains centrally without Flower: run it with fcil-run or fcil-sweep")
    return METHODS.get(cfg.method.name)(cfg, initial_state)


__all__ = ["METHODS", "ClientUpdate", "FederatedStrategy", "RoundPlan", "build_strategy"]
