"""Per-task client partitioners: ``dirichlet(beta)``, ``quantity(alpha)``, ``iid``.

Each builder gets ``(cfg, num_clients, seed, num_task_classes)``; :func:`partition_task`
feeds it the (new) labels of one task's training samples and returns, per client, the
positions into that label array. The assignment itself comes from flwr-datasets'
partitioners; :func:`ensure_min_samples` then moves samples from the largest clients so
that every client has at least ``min_samples`` (seeded, so every process agrees).
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from fedcil.errors import ConfigError
from fedcil.registry import Registry

if TYPE_CHECKING:
    from flwr_datasets.partitioner.partitioner import Partitioner

# flwr-datasets (and Hugging Face datasets under it) is imported where it is used: the
# ServerApp never partitions, so it does not pay the import.

PARTITIONERS: Registry = Registry("partitioner")


@PARTITIONERS.register("dirichlet")
def dirichlet(cfg: DictConfig, num_clients: int, seed: int, num_task_classes: int) -> Partitioner:
    """For every class, client shares ~ Dirichlet(beta)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    if cfg.beta <= 0:
        raise ConfigError(f"partition.beta={cfg.beta} must be > 0")
    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(cfg.beta),
        min_partition_size=0,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


@PARTITIONERS.register("quantity")
def quantity(cfg: DictConfig, num_clients: int, seed: int, num_task_classes: int) -> Partitioner:
    """Every client holds ``alpha`` of the task's classes (capped at the task's class count)."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    if cfg.alpha < 1:
        raise ConfigError(f"partition.alpha={cfg.alpha} must be >= 1")
    per_client = min(int(cfg.alpha), num_task_classes)
    if num_clients * per_client < num_task_classes:
        raise ConfigError(
            f"partition.alpha={cfg.alpha} with {num_clients} clients cannot cover "
            f"{num_task_classes} classes per task (need num_clients * alpha >= classes per task)"
        )
    mode = "first-deterministic" if num_clients >= num_task_classes else "deterministic"
    return PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=per_client,
        class_assignment_mode=mode,
        shuffle=True,
        seed=seed,
    )


@PARTITIONERS.register("iid")
def iid(cfg: DictConfig, num_clients: int, seed: int, num_task_classes: int) -> Partitioner:
    """Equal shares of the (seeded, shuffled) samples."""
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_clients)


def ensure_min_samples(parts: list[np.ndarray], min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest client to any client below ``min_samples``."""
    total = sum(len(p) for p in parts)
    if total < min_samples * len(parts):
        raise ConfigError(
            f"partition.min_samples={min_samples} x {len(parts)} clients exceeds the task's {total} samples"
        )
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    while True:
        sizes = np.array([len(p) for p in parts])
        poor = int(np.argmin(sizes))
        if sizes[poor] >= min_samples:
            return parts
        rich = int(np.argmax(sizes))
        pick = int(rng.integers(len(parts[rich])))
        parts[poor] = np.append(parts[poor], parts[rich][pick])
        parts[rich] = np.delete(parts[rich], pick)


def partition_task(labels: np.ndarray, num_clients: int, cfg: DictConfig, seed: int) -> list[np.ndarray]:
    """Split one task's samples (given by their labels) across ``num_clients`` clients."""
    from datasets import Dataset

    partitioner = PARTITIONERS.get(cfg.name)(cfg, num_clients, seed, len(np.unique(labels)))
    # Rows go in a seeded random order so that order-based partitioners (iid) are random too.
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = Dataset.from_dict({"label": labels[order], "position": order})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [np.asarray(partitioner.load_partition(k)["position"], dtype=np.int64) for k in range(num_clients)]
    return ensure_min_samples(parts, int(cfg.min_samples), np.random.default_rng(seed))
