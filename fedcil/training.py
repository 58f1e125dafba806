"""Local training and class-incremental evaluation, plain functions without Flower."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedcil.data import iterate_batches
from fedcil.errors import choices_error
from fedcil.model import FCILModel, trainable_parameters
from fedcil.protocol import param_group

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """What one local training call needs besides the model and the data."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum) over ``params``."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    raise choices_error("optimizer", settings.optimizer, list(OPTIMIZERS))


def train_local(
    model: FCILModel,
    dataset: Dataset,
    indices: np.ndarray,
    label_map: torch.Tensor,
    task_classes: range,
    train_groups: list[str],
    settings: TrainSettings,
    device: torch.device,
) -> float:
    """Train the parameter groups ``train_groups`` (of ``lora_A``, ``lora_B``, ``head``).

    Cross-entropy over the current task's classes only (logits of other classes masked
    out), as usual in class-incremental learning. Returns the mean training loss.
    """
    params = [p for name, p in trainable_parameters(model).items() if param_group(name) in train_groups]
    for name, param in trainable_parameters(model).items():
        param.requires_grad_(param_group(name) in train_groups)
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    first, last = task_classes.start, task_classes.stop
    model.to(device).train()
    total, count = 0.0, 0
    for _ in range(settings.epochs):
        for images, labels in iterate_batches(dataset, indices, settings.batch_size, shuffle=True, generator=generator):
            images, targets = images.to(device), label_map[labels].to(device) - first
            loss = F.cross_entropy(model(images)[:, first:last], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
    model.eval()
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: FCILModel, dataset: Dataset, indices: np.ndarray, num_seen: int, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels over the first ``num_seen`` classes, and the raw labels, for ``indices``."""
    model.to(device).eval()
    preds, raw = [], []
    for images, labels in iterate_batches(dataset, indices, batch_size):
        preds.append(model(images.to(device))[:, :num_seen].argmax(dim=1).cpu())
        raw.append(labels)
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy(), torch.cat(raw).numpy()


def correct_per_task(
    model: FCILModel, experiment, task: int, batch_size: int, device: torch.device, among: np.ndarray | None = None
) -> tuple[list[int], list[int]]:
    """Per task ``0..task``: test samples predicted right, and test samples, over all seen classes.

    ``among`` restricts the test set to those indices (a client's own test shard).
    """
    indices = np.concatenate([experiment.test_indices(i) for i in range(task + 1)])
    if among is not None:
        indices = np.intersect1d(indices, among)
    preds, _ = predict(model, experiment.data.test, indices, experiment.split.num_seen(task), batch_size, device)
    truth = experiment.test_labels[indices]
    owner = experiment.split.task_of(truth)
    correct, counts = [], []
    for i in range(task + 1):
        mask = owner == i
        counts.append(int(mask.sum()))
        correct.append(int((preds[mask] == truth[mask]).sum()))
    return correct, counts


def accuracies(correct: list[int], counts: list[int]) -> list[float]:
    """Per-task accuracy in percent (NaN for a task without test samples)."""
    return [float(100.0 * (c / n)) if n else float("nan") for c, n in zip(correct, counts)]


def evaluate_seen_tasks(
    model: FCILModel, experiment, task: int, batch_size: int, device: torch.device
) -> tuple[list[float], list[int]]:
    """Accuracy (percent) on each task ``0..task``'s test classes, predicting over all seen.

    Returns the per-task accuracies and the per-task test-sample counts.
    """
    correct, counts = correct_per_task(model, experiment, task, batch_size, device)
    return accuracies(correct, counts), counts
