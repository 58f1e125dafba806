"""What a client replies after its local round, as the request's ``statistics`` asks.

``none``  the trained tensors of the requested groups (FedAvg-style methods);
``lorm``  LoRM's pre-multiplied summaries of the trained factor and the head rows;
``gram``  the regularised Grams of every adapted layer (LoRM's end of task).
Grams are taken after training, over every token of the client's current-task data;
summaries are computed in float64 and sent as float32.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from fedcil.errors import choices_error
from fedcil.experiment import Experiment
from fedcil.gram import compute_grams
from fedcil.model import FCILModel, adapted_layers, get_trainable_state, param_group, resolve_device
from fedcil.protocol import TensorDict, TrainRequest
from strategies.lorm import ROUND_STATISTICS, TASK_END_STATISTICS, client_summaries

STATISTICS = ("none", ROUND_STATISTICS, TASK_END_STATISTICS)


def layer_grams(
    cfg: DictConfig, model: FCILModel, experiment: Experiment, indices: np.ndarray, with_head: bool
) -> dict:
    """Regularised Grams of the adapted layers' inputs (and the head's, if asked)."""
    modules = dict(adapted_layers(model))
    alphas = {name: float(cfg.method.gram_alpha) for name in modules}
    if with_head:
        modules["head"], alphas["head"] = model.head, float(cfg.method.head_gram_alpha)
    data = experiment.data.train
    return compute_grams(model, modules, alphas, data, indices, cfg.eval_batch_size, resolve_device(cfg.device))


def reply_tensors(
    cfg: DictConfig, model: FCILModel, request: TrainRequest, experiment: Experiment, indices: np.ndarray
) -> TensorDict:
    """The tensors a client sends back for ``request`` once its local training is done."""
    kind = str(request.extra.get("statistics", "none"))
    state = get_trainable_state(model)
    if kind == "none":
        return {k: v for k, v in state.items() if param_group(k) in request.train_groups}
    if kind == ROUND_STATISTICS:
        factor = next(g for g in request.train_groups if g.startswith("lora_"))
        grams = layer_grams(cfg, model, experiment, indices, with_head=True)
        rows = experiment.split.task_classes(request.task)
        summaries = client_summaries(state, grams, factor, rows, len(indices))
        return {key: value.float() for key, value in summaries.items()}
    if kind == TASK_END_STATISTICS:
        grams = layer_grams(cfg, model, experiment, indices, with_head=False)
        return {f"{layer}.G": gram.float() for layer, gram in grams.items()}
    raise choices_error("statistics", kind, list(STATISTICS))
