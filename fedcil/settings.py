"""Every setting checked once, before anything starts: choices, numeric ranges, the task split.

A bad value fails with one line naming the key, the value and what is allowed. Keys a
config does not have (``partition.beta`` with ``partition=iid``, ``method.ridge`` for
methods other than LoRM) are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from fedcil.shapes import declared_shape
from fedcil.errors import ConfigError, choices_error
from fedcil.tasks import split_for

OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
HEAD_INITS = ("torch", "timm")
WEIGHTINGS = ("bounded", "claimed", "capped", "uniform")  # replies.weighting (server_app/influence.py)
SUMS_OF_STATISTICS = ("lorm", "analytic")  # methods whose replies are statistics, not trained tensors
ANALYTIC_RIDGES = ("gcv", "validation")  # method.ridge of analytic besides a number >= 0: chosen per task (strategies/analytic.py)
DP_METHODS = ("fedavg_lora", "ffa_lora", "head_only")  # methods whose merge is an average of trained tensors: dp
CHOICES = {
    "backend": ("flower", "inprocess"),
    "evaluation": ("server", "clients"),
    "eval_every_round": ("auto", True, False),
    "optimizer": OPTIMIZERS,
    "precision": PRECISIONS,
    "model.head_init": HEAD_INITS,
    "replies.weighting": WEIGHTINGS,
    "replies.gram_dtype": ("float32", "float64"),  # fedcil.protocol.GRAM_DTYPES (not imported: it needs torch)
    "method.gram_model": ("own", "running_average"),  # strategies.lorm.GRAM_MODELS (not imported: it needs torch)
    "secagg.enabled": (True, False),
    "secagg.modulus_bits": (32, 64),
    "dp.enabled": (True, False),
    "dp.secret_sampling": (True, False),
}


def optional_float(value: float | None) -> float | None:
    """A setting that is a number or null (that setting off)."""
    return None if value is None else float(value)


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting: a type, bounds (open or closed) and null or not."""

    kind: type = float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def allows(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        bounds = []
        if self.low > -math.inf:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high < math.inf:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = f"{'an integer' if self.kind is int else 'a number'} {' and '.join(bounds)}".strip()
        return f"{text} or null" if self.nullable else text


def at_least(low: float, kind: type = int, nullable: bool = False) -> Range:
    return Range(kind, low=low, nullable=nullable)


def positive(kind: type = float, nullable: bool = False) -> Range:
    return Range(kind, low=0, low_open=True, nullable=nullable)


FRACTION = Range(float, low=0, high=1, low_open=True)  # (0, 1]
UNIT = Range(float, low=0, high=1)  # [0, 1]

RANGES: dict[str, Range] = {
    "seed": at_least(0),
    "num_clients": at_least(1),
    "num_tasks": at_least(1),
    "classes_per_task": at_least(1, nullable=True),
    "train_per_class": at_least(1, nullable=True),
    "test_per_class": at_least(1, nullable=True),
    "rounds_per_task": at_least(1),
    "local_epochs": at_least(1),
    "batch_size": at_least(1),
    "eval_batch_size": at_least(1),
    "lr": positive(),
    "weight_decay": at_least(0, float),
    "momentum": Range(float, low=0, high=1, high_open=True),
    "fraction_train": FRACTION,
    "client_resources.num_cpus": positive(),
    "client_resources.num_gpus": at_least(0, float),
    "client_resources.clients_per_gpu": at_least(1),
    "node_wait_seconds": positive(),
    "round_timeout": positive(nullable=True),
    "min_replies": at_least(1),
    "replies.max_examples": at_least(1),
    "replies.max_norm": positive(),
    "replies.clip_norm": positive(nullable=True),
    "replies.update_factor": at_least(1, float, nullable=True),
    "replies.cap_factor": at_least(1, float),
    "replies.max_share": Range(float, low=0, high=1, low_open=True, high_open=True),
    "replies.energy_factor": Range(float, low=1, low_open=True, nullable=True),
    "replies.psd_tolerance": at_least(0, float, nullable=True),
    "replies.direction_factor": at_least(1, float, nullable=True),
    "secagg.num_neighbours": at_least(2, nullable=True),
    "secagg.threshold": Range(float, low=0.5, high=1, low_open=True),
    "secagg.max_dropouts": at_least(0, nullable=True),
    "secagg.exponent_slack": at_least(0),
    "dp.noise_multiplier": positive(),
    "dp.max_epsilon": positive(nullable=True),
    "dp.delta": Range(float, low=0, high=1, low_open=True, high_open=True),
    "lora.rank": at_least(1),
    "lora.alpha": positive(),
    "lora.dropout": Range(float, low=0, high=1, high_open=True),
    "partition.beta": positive(),
    "partition.alpha": at_least(1),
    "partition.min_samples": at_least(0),
    "method.gram_alpha": UNIT,
    "method.head_gram_alpha": UNIT,
    "method.gram_passes": at_least(1),
    "method.ridge": at_least(0, float),
    "method.projection_dim": at_least(0),
    "method.holdout": Range(float, low=0, high=1, low_open=True, high_open=True),
    "dataset.test_fraction": Range(float, low=0, high=1, low_open=True, high_open=True),
    "pretrain.epochs": at_least(1),
    "pretrain.batch_size": at_least(2),
    "pretrain.lr": positive(),
    "pretrain.temperature": positive(),
}


def evaluates_every_round(cfg: DictConfig) -> bool:
    """``eval_every_round``; ``auto`` is every round when the server evaluates (no messages) and
    only after each task's last round when the clients do (an exchange with every node)."""
    if cfg.eval_every_round == "auto":
        return cfg.evaluation == "server"
    return bool(cfg.eval_every_round)


def check_secure_aggregation(cfg: DictConfig) -> None:
    """What secure aggregation needs: no per-client clipping, bounding or weighting, at least 2 clients a round, a ring of even degree."""
    if cfg.replies.clip_norm is not None:
        raise ConfigError("replies.clip_norm clips each client's update, which secure aggregation hides; "
                          "set replies.clip_norm=null or secagg.enabled=false")
    if cfg.replies.weighting != "claimed":
        raise ConfigError(f"replies.weighting={cfg.replies.weighting} weighs each client's reply, which secure aggregation "
                          "hides; set replies.weighting=claimed or secagg.enabled=false")
    if cfg.replies.update_factor is not None and cfg.method.name not in SUMS_OF_STATISTICS:
        raise ConfigError(f"replies.update_factor={cfg.replies.update_factor:g} bounds each client's update, which secure "
                          "aggregation hides; set replies.update_factor=null or secagg.enabled=false")
    if cfg.method.name == "analytic" and cfg.rounds_per_task > 1:
        raise ConfigError(f"secagg.enabled=true with method=analytic and rounds_per_task={cfg.rounds_per_task}: its "
                          "statistics repeat every round, which clients refuse to sum twice; allowed: rounds_per_task=1")
    sampled = max(1, int(round(cfg.fraction_train * cfg.num_clients)))
    if sampled < 2:
        raise ConfigError(f"secagg.enabled=true with {sampled} client a round (num_clients={cfg.num_clients}, "
                          f"fraction_train={cfg.fraction_train}): a sum of one reply is that reply; use at least 2")
    degree = cfg.secagg.num_neighbours
    if degree is not None and degree % 2:
        raise ConfigError(f"secagg.num_neighbours={degree} is odd; allowed: an even number >= 2 (a ring) or null (every client)")
    if degree is not None and degree < sampled - 1 and cfg.secagg.threshold < 2 / 3:
        raise ConfigError(f"secagg.threshold={cfg.secagg.threshold:g} with a ring (secagg.num_neighbours={degree}); allowed: "
                          "at least 2/3 (a ring leaves a server that lies about dropouts more room; docs/secure_aggregation.md)")


def check_differential_privacy(cfg: DictConfig) -> None:
    """What central DP needs: an averaging method, clipped, unbounded by the median and uniformly weighted replies,
    no secagg, delta < 1/num_clients."""
    if cfg.method.name not in DP_METHODS:
        raise ConfigError(f"dp.enabled=true with method={cfg.method.name}; allowed methods: {', '.join(DP_METHODS)}")
    if cfg.replies.clip_norm is None:
        raise ConfigError("dp.enabled=true needs replies.clip_norm (it bounds each client's update); allowed: a number > 0")
    if cfg.replies.weighting != "uniform":
        raise ConfigError(f"dp.enabled=true with replies.weighting={cfg.replies.weighting}; allowed: uniform "
                          "(the noise is scaled to a plain average of the replies)")
    if cfg.replies.update_factor is not None:
        raise ConfigError(f"dp.enabled=true with replies.update_factor={cfg.replies.update_factor:g}; allowed: null "
                          "(a bound relative to the round's median lets one client change every other client's update)")
    if cfg.secagg.enabled:
        raise ConfigError("dp.enabled=true with secagg.enabled=true; allowed: one of them "
                          "(the server must see each update to clip it)")
    if cfg.dp.delta * cfg.num_clients >= 1:
        raise ConfigError(f"dp.delta={cfg.dp.delta:g} with num_clients={cfg.num_clients}; allowed: below "
                          f"1/num_clients={1 / cfg.num_clients:.3g} (else publishing one client's data fits the bound)")


def check_analytic(cfg: DictConfig) -> None:
    """``method.ridge`` (a number >= 0, ``gcv`` or ``validation``) and ``method.blocks`` (null or a list of distinct integers;
    the model checks them against the backbone's depth)."""
    ridge = cfg.method.ridge
    if ridge not in ANALYTIC_RIDGES and not at_least(0, float).allows(ridge):
        raise ConfigError(f"method.ridge={ridge!r} is out of range; allowed: {', '.join(ANALYTIC_RIDGES)} or a number >= 0")
    blocks = OmegaConf.to_container(cfg.method, resolve=True).get("blocks")
    if blocks is not None and (not isinstance(blocks, list) or not blocks or len(set(blocks)) != len(blocks)
                               or not all(at_least(0).allows(b) for b in blocks)):
        raise ConfigError(f"method.blocks={blocks!r} is not valid; allowed: null (the backbone's pooled features) or a "
                          "non-empty list of distinct block indices >= 0, e.g. [0, 1, 2, 3]")


def check_settings(cfg: DictConfig) -> None:
    """Raise a one-line :class:`ConfigError` for the first setting outside its choices or range."""
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and value not in valid:
            raise choices_error(key, value, list(valid))
    if cfg.method.name == "analytic":
        check_analytic(cfg)
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if cfg.method.name == "analytic" and key == "method.ridge" and value in ANALYTIC_RIDGES:
            continue
        if value != "__absent__" and not allowed.allows(value):
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed.describe()}")
    if cfg.replies.clip_norm is not None and cfg.method.name in SUMS_OF_STATISTICS:
        raise ConfigError("replies.clip_norm applies to methods whose clients send trained tensors; "
                          f"{cfg.method.name} sends Gram summaries: set replies.clip_norm=null")
    if cfg.dp.enabled:
        check_differential_privacy(cfg)
    if cfg.secagg.enabled:
        check_secure_aggregation(cfg)
    if cfg.min_replies > cfg.num_clients:
        raise ConfigError(f"min_replies={cfg.min_replies} exceeds num_clients={cfg.num_clients}; allowed: 1..{cfg.num_clients}")
    try:
        num_classes = declared_shape(cfg.dataset).num_classes
    except ConfigError:  # an image folder whose class count is only known once loaded
        return
    split_for(cfg, num_classes)
