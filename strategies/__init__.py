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
from strategies.analytic import Analytic
from strategies.base import ClientRound, FederatedStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fedex_lora import FedExLoRA
from strategies.ffa_lora import FFALoRA
from strategies.head_only import HeadOnly
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
METHODS.register("head_only")(HeadOnly)
METHODS.register("analytic")(Analytic)


CENTRALISED = ("joint",)


def method_class(name: str) -> type[FederatedStrategy]:
    """The strategy class registered as ``name`` (one line listing the valid names otherwise)."""
    if name in CENTRALISED:
        raise ConfigError(f"method={name} trains centrally without Flower: run it with fcil-run or fcil-sweep")
    return METHODS.get(name)


def check_split(name: str, split: TaskSplit) -> None:
    """Refuse a task split the method cannot learn from (one line naming the fix)."""
    if method_class(name).trains_masked_head and split.classes_per_task < 2:
        raise ConfigError(
            f"classes_per_task={split.classes_per_task}: method={name} trains with a cross-entropy over each task's "
            "classes, which is identically zero over one class; use classes_per_task >= 2 or method=analytic"
        )


def check_secure(name: str, secure: bool) -> None:
    """Refuse secure aggregation (``secure``) for a method whose merge needs each client's reply."""
    if secure and method_class(name).secure_sum is None:
        supported = sorted(n for n in METHODS.names() if METHODS.get(n).secure_sum is not None)
        raise ConfigError(
            f"secagg.enabled=true: method={name} merges each client's own factors, which secure aggregation hides; "
            f"methods that support it: {', '.join(supported)}"
        )


def build_strategy(cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> FederatedStrategy:
    """The strategy named by ``cfg.method.name`` for a run with task split ``split``, starting from ``initial_state``."""
    check_split(cfg.method.name, split)
    check_secure(cfg.method.name, bool(cfg.secagg.enabled))
    return method_class(cfg.method.name).from_config(cfg, split, initial_state)


__all__ = ["METHODS", "ClientRound", "ClientUpdate", "FederatedStrategy", "RoundPlan", "build_strategy", "check_split", "method_class"]
