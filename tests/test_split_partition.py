"""Class-incremental split and per-task partitioners."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedcil.errors import ConfigError
from fedcil.experiment import build_experiment
from fedcil.partition import ensure_min_samples, partition_task
from fedcil.tasks import make_task_split


def labels_of(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def part_cfg(**kwargs):
    return OmegaConf.create({"min_samples": 2, **kwargs})


def test_split_natural_and_shuffled_orders():
    natural = make_task_split(10, 5, None, "natural", seed=0)
    assert list(natural.class_order) == list(range(10))
    assert list(natural.task_classes(2)) == [4, 5] and natural.num_seen(2) == 6
    shuffled = [make_task_split(10, 5, None, "shuffle", seed=s).class_order for s in (0, 0, 1)]
    assert sorted(shuffled[0]) == list(range(10))
    assert np.array_equal(shuffled[0], shuffled[1]) and not np.array_equal(shuffled[0], shuffled[2])


def test_remap_puts_each_task_on_a_label_prefix():
    split = make_task_split(10, 5, None, "shuffle", seed=3)
    labels = np.arange(10)
    new = split.remap(labels)
    assert np.array_equal(new[split.class_order], np.arange(10))
    assert np.array_equal(split.task_of(new[split.class_order]), np.repeat(np.arange(5), 2))


def test_split_with_explicit_classes_per_task_leaves_the_rest_out():
    split = make_task_split(10, 3, 2, "natural", seed=0)
    assert list(split.remap(np.arange(10))) == [0, 1, 2, 3, 4, 5, -1, -1, -1, -1]


@pytest.mark.parametrize(
    "args", [(10, 3, 4, "natural"), (10, 0, None, "natural"), (10, 5, None, "sorted")]
)
def test_split_rejects_bad_settings(args):
    with pytest.raises(ConfigError):
        make_task_split(*args, seed=0)


@pytest.mark.parametrize(
    "cfg", [part_cfg(name="dirichlet", beta=0.5), part_cfg(name="quantity", alpha=1), part_cfg(name="iid")]
)
def test_partitions_are_deterministic_and_cover_every_sample_once(cfg):
    labels = labels_of(4, 50)
    parts = partition_task(labels, 6, cfg, seed=11)
    again = partition_task(labels, 6, cfg, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    merged = np.concatenate(parts)
    assert len(merged) == len(labels) and np.array_equal(np.sort(merged), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= cfg.min_samples
    other = partition_task(labels, 6, cfg, seed=12)
    assert cfg.name == "quantity" or any(not np.array_equal(a, b) for a, b in zip(parts, other))


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between client label histograms and the global one."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    dists = [0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - overall).sum() for p in parts if len(p)]
    return float(np.mean(dists))


def test_dirichlet_skew_grows_as_beta_shrinks():
    labels = labels_of(5, 400)
    skews = [
        np.mean([label_skew(partition_task(labels, 10, part_cfg(name="dirichlet", beta=b), s), labels) for s in range(5)])
        for b in (100.0, 1.0, 0.1, 0.01)
    ]
    assert skews == sorted(skews) and skews[-1] > 3 * skews[0]


def test_quantity_partition_gives_each_client_alpha_classes():
    labels = labels_of(10, 30)
    parts = partition_task(labels, 10, part_cfg(name="quantity", alpha=2, min_samples=0), seed=5)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)
    with pytest.raises(ConfigError, match="alpha"):
        partition_task(labels, 3, part_cfg(name="quantity", alpha=2), seed=5)


def test_min_samples_holds_even_under_extreme_skew():
    labels = labels_of(2, 40)
    parts = partition_task(labels, 10, part_cfg(name="dirichlet", beta=0.01, min_samples=5), seed=0)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ConfigError, match="min_samples"):
        ensure_min_samples([np.arange(5), np.arange(5, 9)], 5, np.random.default_rng(0))


def test_experiment_clients_get_only_their_task_classes(cfg):
    experiment = build_experiment(cfg)
    for task in range(experiment.num_tasks):
        parts = experiment.partitions(task)
        assert len(parts) == cfg.num_clients
        for part in parts:
            assert set(experiment.split.task_of(experiment.train_labels[part])) == {task}
        task_total = np.sum(experiment.split.task_of(experiment.train_labels) == task)
        assert sum(len(p) for p in parts) == task_total
    test_tasks = experiment.split.task_of(experiment.test_labels[experiment.test_indices(2)])
    assert set(test_tasks) == {2}

