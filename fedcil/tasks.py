"""Class-incremental split: an order of the classes cut into tasks of equal size.

Labels are remapped to their position in the class order, so task ``t`` owns the
contiguous labels ``[t * c, (t + 1) * c)`` and "classes seen so far" is a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedcil.errors import ConfigError, choices_error

if TYPE_CHECKING:
    from omegaconf import DictConfig

CLASS_ORDERS = ("natural", "shuffle")


@dataclass(frozen=True)
class TaskSplit:
    """``class_order[j]`` is the original class that gets the new label ``j``."""

    class_order: np.ndarray
    num_tasks: int
    classes_per_task: int

    def task_classes(self, task: int) -> range:
        """New labels of the classes task ``task`` brings."""
        return range(task * self.classes_per_task, (task + 1) * self.classes_per_task)

    def num_seen(self, task: int) -> int:
        """Number of classes seen after task ``task`` (a label prefix)."""
        return (task + 1) * self.classes_per_task

    def remap(self, labels: np.ndarray) -> np.ndarray:
        """Original labels -> new labels; classes outside every task map to -1."""
        lookup = np.full(int(max(labels.max(initial=0), self.class_order.max())) + 1, -1, dtype=np.int64)
        lookup[self.class_order] = np.arange(len(self.class_order))
        return lookup[labels]

    def task_of(self, new_labels: np.ndarray) -> np.ndarray:
        """Task index of each (new) label; -1 stays -1."""
        return np.where(new_labels >= 0, new_labels // self.classes_per_task, -1)


def make_task_split(
    num_classes: int, num_tasks: int, classes_per_task: int | None, class_order: str, seed: int
) -> TaskSplit:
    """Order the classes (natural or seeded shuffle) and cut them into equal tasks.

    ``classes_per_task=None`` splits every class evenly (``num_tasks`` must divide them);
    a number uses the first ``num_tasks x classes_per_task`` classes of the order.
    """
    if class_order not in CLASS_ORDERS:
        raise choices_error("class_order", class_order, list(CLASS_ORDERS))
    if num_tasks < 1:
        raise ConfigError(f"num_tasks={num_tasks} must be >= 1")
    per_task = classes_per_task if classes_per_task is not None else num_classes // num_tasks
    if per_task < 1 or per_task * num_tasks > num_classes:
        raise ConfigError(
            f"num_tasks={num_tasks} x classes_per_task={per_task} does not fit {num_classes} classes"
        )
    if classes_per_task is None and num_classes % num_tasks:
        raise ConfigError(
            f"num_tasks={num_tasks} does not divide the {num_classes} classes; set classes_per_task to use "
            f"{num_tasks} x classes_per_task of them (e.g. classes_per_task={num_classes // num_tasks})"
        )
    order = np.arange(num_classes)
    if class_order == "shuffle":
        order = np.random.default_rng(seed).permutation(num_classes)
    return TaskSplit(class_order=order[: per_task * num_tasks], num_tasks=num_tasks, classes_per_task=per_task)


def split_for(cfg: DictConfig, num_classes: int) -> TaskSplit:
    """The task split ``cfg`` asks for on a data set of ``num_classes`` classes."""
    return make_task_split(num_classes, cfg.num_tasks, cfg.classes_per_task, cfg.class_order, cfg.seed)
