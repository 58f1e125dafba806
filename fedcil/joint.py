"""Joint training, the upper bound: the same model and adapter trained centrally.

At step ``t`` the adapter and head keep training on the union of the training data of
tasks ``0..t`` (every client's share, pooled), with cross-entropy over every class seen,
for ``rounds_per_task x local_epochs`` epochs; then the model is evaluated like the
federated methods. No Flower, no communication: it writes the same results files.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig

from fedcil.experiment import experiment_for
from fedcil.model import build_model, resolve_device
from fedcil.results import finish_run, resolve_output_dir
from fedcil.training import TrainSettings, evaluate_seen_tasks, train_local


def run_joint(cfg: DictConfig, log: Callable[[str], None] = print) -> dict:
    """Train and evaluate step by step on all data seen so far; write and return results."""
    started, started_at = time.monotonic(), time.time()
    output_dir = resolve_output_dir(cfg)
    experiment = experiment_for(cfg)
    data = experiment.data
    model = build_model(cfg.model, cfg.lora, data.num_classes, data.in_chans, data.image_size, cfg.seed)
    device = resolve_device(cfg.device)
    task_of = experiment.split.task_of(experiment.train_labels)
    setup_seconds = time.monotonic() - started
    accuracy_matrix: list[list[float | None]] = []
    rounds: list[dict] = []
    counts: list[int] = []
    for task in range(experiment.num_tasks):
        step_start = time.monotonic()
        indices = np.flatnonzero((task_of >= 0) & (task_of <= task))
        settings = TrainSettings.from_config(cfg, epochs=cfg.rounds_per_task * cfg.local_epochs, seed=cfg.seed + task)
        loss = train_local(model, data.train, indices, experiment.label_map, range(experiment.split.num_seen(task)),
                           ["lora_A", "lora_B", "head"], settings, device)
        per_task, counts = evaluate_seen_tasks(model, experiment, task, cfg.eval_batch_size, device)
        accuracy_matrix.append(per_task + [None] * (experiment.num_tasks - task - 1))
        accuracy = float(np.average(per_task, weights=counts))
        rounds.append({"task": task, "round": 0, "clients": 1, "loss": loss, "accuracy": accuracy,
                       "bytes_up": 0, "bytes_down": 0, "seconds": time.monotonic() - step_start, "missing": [], "failures": {}})
        log(f"joint: [task {task + 1}/{experiment.num_tasks}] {len(indices)} images, loss {loss:.4f}, "
            f"acc(seen) {accuracy:.2f}%, {rounds[-1]['seconds']:.0f}s")
    return finish_run(cfg, output_dir, accuracy_matrix, counts, rounds, (started, started_at, setup_seconds), log)
