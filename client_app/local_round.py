"""One client round as a plain function: rebuild everything from config, train, reply.

Nothing here is specific to a method: after local training the method's own client hook
(:meth:`strategies.base.FederatedStrategy.client_reply`) decides what to send back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from flwr.app import RecordDict
from omegaconf import DictConfig

from client_app.node import NodeJob
from fedcil.augment import CropFlip
from fedcil.closed_form import Gram
from fedcil.config import compose_config
from fedcil.data import iterate_batches
from fedcil.errors import ConfigError
from fedcil.experiment import Experiment, experiment_for
from fedcil.gram import compute_grams
from fedcil.model import (
    FCILModel, adapted_layers, get_trainable_state, model_for, resolve_device, scaled_adapters, set_base_deltas, set_sent_state,
)
from fedcil.protocol import EVAL_COUNT, EVAL_CORRECT, TensorDict, TrainRequest, decode_request, encode_reply, unpack_base
from fedcil.training import TrainSettings, correct_per_task, train_local
from strategies import ClientRound, method_class


def round_seed(seed: int, task: int, round_in_task: int, partition_id: int) -> int:
    """Seed of one client's local shuffling in one round."""
    return int(np.random.SeedSequence([seed, task, round_in_task, partition_id]).generate_state(1)[0])


def input_grams(
    model: FCILModel, experiment: Experiment, request: TrainRequest, indices: np.ndarray, batch_size: int,
    device: torch.device, views: Callable[[torch.Tensor], torch.Tensor] | None,
    layer_alpha: float, head_alpha: float | None, passes: int = 1,
) -> dict[str, Gram]:
    """Regularised Grams of the adapted layers' inputs over ``indices`` (and the head's, unless ``head_alpha`` is None),
    averaged over ``passes`` passes.

    ``views`` (if any) augments the images first. The pass runs under the request's Gram model: ``W0`` plus its
    ``gram_base`` and the trained adapter weighted by its ``gram_adapter_scale``; the request's ``base`` is back after.
    """
    modules = dict(adapted_layers(model))
    alphas = {name: layer_alpha for name in modules}
    if head_alpha is not None:
        modules["head"], alphas["head"] = model.head, head_alpha
    if not request.gram_base and request.gram_adapter_scale == 1.0:
        return compute_grams(model, modules, alphas, experiment.data.train, indices, batch_size, device, views, passes)
    set_base_deltas(model, unpack_base(request.gram_base))
    try:
        with scaled_adapters(model, request.gram_adapter_scale):
            return compute_grams(model, modules, alphas, experiment.data.train, indices, batch_size, device, views, passes)
    finally:
        set_base_deltas(model, unpack_base(request.base))


def gram_views(cfg: DictConfig, seed: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training augmentation for the Gram pass (``augment.in_grams``), seeded; None when off."""
    if not (cfg.augment.enabled and cfg.augment.in_grams):
        return None
    crop, generator = CropFlip.from_config(cfg.augment), torch.Generator().manual_seed(seed)
    return lambda images: crop(images, generator)


@torch.no_grad()
def head_features(
    model: FCILModel, experiment: Experiment, indices: np.ndarray, batch_size: int, device: torch.device, raw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head sees for the images ``indices`` (float64, on the CPU; with ``raw``, the features before
    the standardiser and random feature map) and their labels (task split's)."""
    model.to(device).eval()
    extract = model.raw_features if raw else model.head_inputs
    features, labels = [], []
    for images, classes in iterate_batches(experiment.data.train, indices, batch_size):
        features.append(extract(images.to(device)).to(torch.float64).cpu())
        labels.append(experiment.label_map[classes])
    if not features:
        width = model.raw_width if raw else model.head.in_features
        return torch.zeros(0, width, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels)


def run_local_round(
    cfg: DictConfig, request: TrainRequest, partition_id: int, num_partitions: int
) -> tuple[TensorDict, int, float]:
    """Train on this client's share of ``request.task``; return (tensors, num_examples, loss).

    A request with no train groups only asks for statistics (loss 0); one with ``evaluate``
    asks for per-task correct and total counts on this client's test shard. The client keeps
    nothing between calls that a restart would lose: data, split and partition follow
    from the config, the model state and any change of the frozen ``W0`` arrive with the
    request.
    """
    if num_partitions != cfg.num_clients:
        raise ConfigError(f"node config num-partitions={num_partitions} != config num_clients={cfg.num_clients}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config partition-id={partition_id} outside 0..{num_partitions - 1}")
    experiment = experiment_for(cfg)
    data = experiment.data
    model = model_for(cfg, data.num_classes, data.in_chans, data.image_size)
    set_sent_state(model, request.state)
    set_base_deltas(model, unpack_base(request.base))
    device = resolve_device(cfg.device)
    if request.extra.get("evaluate"):
        shard = experiment.test_shard(partition_id, num_partitions)
        correct, counts = correct_per_task(model, experiment, request.task, cfg.eval_batch_size, device, among=shard)
        tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in ((EVAL_CORRECT, correct), (EVAL_COUNT, counts))}
        return tensors, len(shard), 0.0
    indices = experiment.client_indices(request.task, partition_id)
    seed = round_seed(cfg.seed, request.task, request.round_in_task, partition_id)
    settings = TrainSettings.from_config(cfg, epochs=cfg.local_epochs, seed=seed)
    loss = 0.0
    if request.train_groups:
        loss = train_local(
            model,
            data.train,
            indices,
            experiment.label_map,
            experiment.split.task_classes(request.task),
            list(request.train_groups),
            settings,
            device,
        )
    client = ClientRound(
        request=request,
        trained=get_trainable_state(model),
        num_examples=len(indices),
        task_classes=experiment.split.task_classes(request.task),
        input_grams=partial(
            input_grams, model, experiment, request, indices, cfg.eval_batch_size, device, gram_views(cfg, seed + 1)
        ),
        head_features=partial(head_features, model, experiment, indices, cfg.eval_batch_size, device),
    )
    return method_class(cfg.method.name).client_reply(cfg.method, client), len(indices), loss


def answer_request(cfg: DictConfig, content: RecordDict, partition_id: int, num_partitions: int) -> RecordDict:
    """The reply records to one request's records: what a ClientApp sends back (Grams packed as the request asks)."""
    request = decode_request(content)
    tensors, num_examples, loss = run_local_round(cfg, request, partition_id, num_partitions)
    return encode_reply(tensors, num_examples, loss, request.packing)


def answer(job: NodeJob, content: RecordDict) -> RecordDict:
    """:func:`answer_request` for a node's job: its config composed, torch on its thread count."""
    cfg = compose_config(job.config_name, list(job.overrides))
    torch.set_num_threads(max(1, int(cfg.client_resources.num_cpus)))
    return answer_request(cfg, content, job.partition_id, job.num_partitions)
