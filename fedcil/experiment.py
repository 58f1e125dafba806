"""One experiment's data view: the data set, its task split and every client's share.

Everything here is a pure function of the config, so a ClientApp can rebuild its share
from the run config and its node config alone (no state survives between messages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import json
from functools import lru_cache

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedcil.data import ImageData, load_dataset
from fedcil.errors import ConfigError
from fedcil.partition import partition_task
from fedcil.tasks import TaskSplit, split_for


def task_seed(seed: int, task: int) -> int:
    """A per-task seed derived from the experiment seed (stable across processes)."""
    return int(np.random.SeedSequence([seed, task]).generate_state(1)[0])


@dataclass
class Experiment:
    """Data, task split and partitions of one config; partitions are computed lazily.

    With ``site`` the data are one site's own samples (``dataset.site_dir``): the site's share
    of a task is every sample of the task's classes, and its test shard its whole test set.
    """

    cfg: DictConfig
    data: ImageData
    split: TaskSplit
    train_labels: np.ndarray  # new labels (position in the class order), -1 if unused
    test_labels: np.ndarray
    site: bool = False
    _partitions: dict[int, list[np.ndarray]] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.split.num_tasks

    @property
    def label_map(self) -> torch.Tensor:
        """Lookup tensor: original label -> new label (-1 for classes in no task)."""
        return torch.as_tensor(self.split.remap(np.arange(self.data.num_classes)))

    def partitions(self, task: int) -> list[np.ndarray]:
        """Per client, the train-set indices of its share of task ``task``."""
        if task not in self._partitions:
            task_idx = np.flatnonzero(self.split.task_of(self.train_labels) == task)
            parts = partition_task(
                self.train_labels[task_idx], self.cfg.num_clients, self.cfg.partition, task_seed(self.cfg.seed, task)
            )
            self._partitions[task] = [np.sort(task_idx[p]) for p in parts]
        return self._partitions[task]

    def client_indices(self, task: int, partition_id: int) -> np.ndarray:
        """Train-set indices that client ``partition_id`` holds for task ``task`` (a site: all of the task's)."""
        if self.site:
            return np.flatnonzero(self.split.task_of(self.train_labels) == task)
        return self.partitions(task)[partition_id]

    def test_indices(self, task: int) -> np.ndarray:
        """Test-set indices of task ``task``'s classes."""
        return np.flatnonzero(self.split.task_of(self.test_labels) == task)

    def test_shard(self, partition_id: int, num_partitions: int) -> np.ndarray:
        """Client ``partition_id``'s own share of the test set (a seeded split into disjoint shards; a site: all)."""
        if self.site:
            return np.arange(len(self.test_labels))
        order = np.random.default_rng(self.cfg.seed).permutation(len(self.test_labels))
        return np.sort(np.array_split(order, num_partitions)[partition_id])

    def site_share(self, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
        """What site ``partition_id`` holds: its train indices over all tasks, and its test shard's samples
        that count (in a task, within ``test_per_class``); both sorted, so a site keeps their order."""
        train = np.concatenate([self.client_indices(task, partition_id) for task in range(self.num_tasks)])
        test = self.test_shard(partition_id, num_partitions)
        return np.sort(train), test[self.test_labels[test] >= 0]


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Labels with all but a seeded ``cap`` samples of each class set to -1 (left out)."""
    if cap is None:
        return labels
    if cap < 1:
        raise ConfigError(f"per-class cap {cap} must be >= 1 (or null for all samples)")
    rng = np.random.default_rng(seed)
    kept = labels.copy()
    for cls in np.unique(labels[labels >= 0]):
        members = rng.permutation(np.flatnonzero(labels == cls))
        kept[members[cap:]] = -1
    return kept


def build_experiment(cfg: DictConfig) -> Experiment:
    """Load the data set (or the site's own samples) and cut it into tasks as ``cfg`` says."""
    data = load_dataset(cfg.dataset)
    split = split_for(cfg, data.num_classes)
    return Experiment(
        cfg=cfg,
        data=data,
        split=split,
        train_labels=cap_per_class(split.remap(data.train_labels), cfg.train_per_class, cfg.seed),
        test_labels=cap_per_class(split.remap(data.test_labels), cfg.test_per_class, cfg.seed),
        site=OmegaConf.select(cfg, "dataset.site_dir") is not None,
    )


@lru_cache(maxsize=2)
def _cached_experiment(key: str) -> Experiment:
    return build_experiment(OmegaConf.create(json.loads(key)))


def experiment_for(cfg: DictConfig) -> Experiment:
    """:func:`build_experiment`, cached per process and config."""
    return _cached_experiment(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True))
