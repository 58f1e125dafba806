"""Federated methods, one module each, chosen by ``method.name``."""

from __future__ import annotations

from omegaconf import DictConfig

from fedcil.registry import Registry
from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from strategies.base import FederatedStrategy
from strategies.fedavg_lora import FedAvgLoRA

METHODS: Registry = Registry("method")
METHODS.register("fedavg_lora")(FedAvgLoRA)


def build_strategy(cfg: DictConfig, initial_state: TensorDict) -> FederatedStrategy:
    """The strategy named by ``cfg.method.name``, starting from ``initial_state``."""
    return METHODS.get(cfg.method.name)(cfg, initial_state)


__all__ = ["METHODS", "ClientUpdate", "FederatedStrategy", "RoundPlan", "build_strategy"]
