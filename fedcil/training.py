"""Local training and class-incremental evaluation, plain functions without Flower."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset

from fedcil.augment import CropFlip
from fedcil.data import iterate_batches
from fedcil.errors import choices_error
from fedcil.model import FCILModel, trainable_parameters
from fedcil.protocol import param_group
from fedcil.settings import OPTIMIZERS, PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSettings:
    """What one local training call needs besides the model and the data.

    ``augment`` (if any) transforms every training batch; ``precision`` is the autocast
    dtype of the forward pass on CUDA (``fp16`` with loss scaling); on a CPU it is fp32.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    augment: CropFlip | None = None
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg: DictConfig, epochs: int, seed: int) -> TrainSettings:
        """The run's training settings for ``epochs`` epochs with shuffling (and augmentation) seeded by ``seed``."""
        return cls(
            epochs=epochs, batch_size=int(cfg.batch_size), lr=float(cfg.lr), optimizer=str(cfg.optimizer),
            momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay), seed=seed,
            augment=CropFlip.from_config(cfg.augment) if cfg.augment.enabled else None, precision=str(cfg.precision),
        )


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over ``params``, with ``weight_decay``."""
    lr, decay = settings.lr, settings.weight_decay
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=decay)
    raise choices_error("optimizer", settings.optimizer, list(OPTIMIZERS))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None for fp32 and on a CPU."""
    if precision not in PRECISIONS:
        raise choices_error("precision", precision, list(PRECISIONS))
    return AUTOCAST_DTYPES[precision] if precision != "fp32" and device.type == "cuda" else None


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
    dtype = autocast_dtype(settings.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    model.to(device).train()
    total, count = 0.0, 0
    for _ in range(settings.epochs):
        for images, labels in iterate_batches(dataset, indices, settings.batch_size, shuffle=True, generator=generator):
            if settings.augment is not None:
                images = settings.augment(images, generator)
            images, targets = images.to(device), label_map[labels].to(device) - first
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images)[:, first:last].float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(labels)
            count += len(labels)
    model.eval()
    return total / max(count, 1)


@torch.no_grad()
def seen_logits(
    model: FCILModel, dataset: Dataset, indices: np.ndarray, num_seen: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits over the first ``num_seen`` classes for the images ``indices`` (on the CPU)."""
    model.to(device).eval()
    logits = [model(images.to(device))[:, :num_seen].float().cpu() for images, _ in iterate_batches(dataset, indices, batch_size)]
    return torch.cat(logits) if logits else torch.zeros(0, num_seen)


def correct_per_task(
    model: FCILModel, experiment, task: int, batch_size: int, device: torch.device, among: np.ndarray | None = None,
    task_aware: bool = False,
) -> tuple[list[int], list[int]]:
    """Per task ``0..task``: test samples predicted right, and test samples, over all seen classes.

    ``among`` restricts the test set to those indices (a client's own test shard).
    ``task_aware`` predicts each sample among its own task's classes only (a diagnostic:
    the task id given, as class-incremental evaluation never does).
    """
    indices = np.concatenate([experiment.test_indices(i) for i in range(task + 1)])
    if among is not None:
        indices = np.intersect1d(indices, among)
    logits = seen_logits(model, experiment.data.test, indices, experiment.split.num_seen(task), batch_size, device)
    truth = experiment.test_labels[indices]
    owner = experiment.split.task_of(truth)
    if task_aware:
        classes = torch.arange(logits.shape[1])
        first = torch.as_tensor(owner * experiment.split.classes_per_task).view(-1, 1)
        logits = logits.masked_fill((classes < first) | (classes >= first + experiment.split.classes_per_task), -torch.inf)
    preds = logits.argmax(dim=1).numpy()
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
