"""LoRM (Salami et al., "Closed-form merging of parameter-efficient modules for Federated
Continual Learning"): train one LoRA factor per round and merge it in closed form.

Per adapted layer (``dW = s B A``, ``s`` the LoRA scaling) and client ``k`` with input rows
``X_k`` and regularised Gram ``Ĝ_k = a X_k^T X_k + (1 - a) diag(X_k^T X_k)``, the merge
minimises ``sum_k ||X_k dW^T - X_k dW_k^T||^2`` over the factor trained this round::

    A-round (B shared):  A* = (sum_k A_k Ĝ_k) (sum_k Ĝ_k)^-1
    B-round (A shared):  B* = (sum_k B_k A Ĝ_k A^T) (A (sum_k Ĝ_k) A^T)^-1

Rounds alternate B, A, B, ... (``train_matrix: alt``; B first since it starts at zero).
Clients send only the pre-multiplied summaries (A-round ``A_k Ĝ_k`` and ``Ĝ_k``, B-round
``B_k A Ĝ_k A^T`` and ``A Ĝ_k A^T``; ``Ĝ_k`` is a vector when ``a = 0``), so the server
only ever adds replies up. The head's rows of the current task are merged the same way
(RegMean on the head's inputs, ``a = head_gram_alpha``), its bias by sample-weighted
averaging (clients send ``n_k b_k``).

Across tasks every task trains a fresh adapter (B = 0, A kaiming-uniform) on the frozen
``W0``. When task ``t`` ends, clients send the Grams ``Ĝ_k`` of the final adapter's inputs;
with ``G_t = sum_k Ĝ_k`` and ``dW_t = s B_t A_t`` the evaluated model is::

    W = W0 + (sum_t dW_t G_t) (sum_t G_t)^-1

Within a task (evaluation after a round) the current adapter joins that merge with the
current task's latest Gram sum (from its last A-round), or the previous tasks' mean Gram
before one exists. Every solve runs in float64 with a relative ridge (``ridge``).

Which model the Grams see (``gram_model``): ``own``, the model the task trains, ``W0 + s B_t A_t``;
or ``running_average``, as the authors' code takes them (per round and at the end of a task),
``W0 + s (sum_{u<t} B_u A_u + B_t A_t) / (t + 1)``: the finished tasks' own adapters plainly
averaged, the current one weighted ``1 / (t + 1)``. Training always runs under ``W0 + s B_t A_t``.
Each Gram averages ``gram_passes`` passes over freshly augmented views (the authors' ``regmean_rounds``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedcil.closed_form import Gram, merge_with_grams, sandwich, times_gram
from fedcil.errors import choices_error
from fedcil.protocol import GRAM_ADAPTER_SCALE, ClientUpdate, RoundPlan, Shapes, TensorDict, WeightedSums
from fedcil.tasks import TaskSplit
from strategies.aggregation import fresh_adapter, sum_updates
from strategies.base import ClientRound, FederatedStrategy, lora_scaling

if TYPE_CHECKING:
    from omegaconf import DictConfig

TRAIN_MATRICES = ("alt", "A", "B")
GRAM_MODELS = ("own", "running_average")
ROUND_STATISTICS = "lorm"  # a round's request: summaries of the trained factor and the head rows
TASK_END_STATISTICS = "gram"  # the end-of-task request: the Grams of the final adapter's inputs
STATISTICS = (ROUND_STATISTICS, TASK_END_STATISTICS)


@dataclass(frozen=True)
class LoRMSettings:
    """LoRM's own settings (``conf/method/lorm.yaml``).

    Parameters
    ----------
    train_matrix : ``alt`` (B, A, B, ...), ``A`` or ``B``: the factor each round trains.
    gram_alpha : ``a`` of the adapted backbone layers' Grams (0: diagonal only).
    head_gram_alpha : ``a`` of the head's Gram.
    ridge : relative ridge of every solve, ``eps = ridge * mean(diag(G))``.
    gram_model : the model the Grams are taken under: ``own`` (``W0 + s B_t A_t``, the model the task
        trains) or ``running_average`` (``W0 + s (sum_{u<t} B_u A_u + B_t A_t) / (t + 1)``, as the LoRM code does).
    gram_passes : passes over freshly augmented views that each Gram averages.
    """

    train_matrix: str = "alt"
    gram_alpha: float = 0.0
    head_gram_alpha: float = 0.5
    ridge: float = 1e-6
    gram_model: str = "own"
    gram_passes: int = 1

    def __post_init__(self) -> None:
        if self.train_matrix not in TRAIN_MATRICES:
            raise choices_error("method.train_matrix", self.train_matrix, list(TRAIN_MATRICES))
        if self.gram_model not in GRAM_MODELS:
            raise choices_error("method.gram_model", self.gram_model, list(GRAM_MODELS))

    @classmethod
    def from_config(cls, method: Mapping[str, Any]) -> LoRMSettings:
        """The settings under ``method`` in the config."""
        return cls(
            str(method["train_matrix"]), float(method["gram_alpha"]), float(method["head_gram_alpha"]), float(method["ridge"]),
            str(method["gram_model"]), int(method["gram_passes"]),
        )


def factor_of_round(train_matrix: str, round_in_task: int) -> str:
    """``lora_B`` or ``lora_A``: the factor trained in round ``round_in_task`` of a task."""
    if train_matrix == "alt":
        return "lora_B" if round_in_task % 2 == 0 else "lora_A"
    return f"lora_{train_matrix}"


def trained_factor(plan_groups: tuple[str, ...]) -> str:
    """The LoRA factor among a request's train groups."""
    return next(g for g in plan_groups if g.startswith("lora_"))


def client_summaries(
    trained: TensorDict, grams: dict[str, Gram], factor: str, head_rows: range, num_examples: int
) -> TensorDict:
    """What a client uploads after training ``factor`` (and the head rows of its task), in float64.

    ``trained`` is the client's full trainable state, ``grams`` its regularised Grams per
    adapted layer and ``head``.
    """
    summaries: TensorDict = {}
    for layer, gram in grams.items():
        if layer == "head":
            continue
        A = trained[f"{layer}.lora_A"].to(torch.float64)
        if factor == "lora_A":
            summaries[f"{layer}.AG"] = times_gram(A, gram)
            summaries[f"{layer}.G"] = gram
        else:
            inner = sandwich(A, gram)
            summaries[f"{layer}.BS"] = trained[f"{layer}.lora_B"].to(torch.float64) @ inner
            summaries[f"{layer}.S"] = inner
    rows = slice(head_rows.start, head_rows.stop)
    summaries["head.WG"] = times_gram(trained["head.weight"][rows].to(torch.float64), grams["head"])
    summaries["head.G"] = grams["head"]
    summaries["head.nb"] = num_examples * trained["head.bias"][rows].to(torch.float64)
    return summaries


def gram_shape(dim: int, alpha: float) -> tuple[int, ...]:
    """A regularised Gram of ``dim`` inputs: dense, or its diagonal when ``alpha == 0``."""
    return (dim,) if alpha == 0.0 else (dim, dim)


def summary_shapes(state: TensorDict, factor: str, head_rows: int, settings: LoRMSettings) -> Shapes:
    """Names and shapes of :func:`client_summaries` for a model with trainable ``state``."""
    shapes: Shapes = {}
    for key in state:
        if not key.endswith(".lora_A"):
            continue
        layer = key.removesuffix(".lora_A")
        rank, d_in = state[key].shape
        if factor == "lora_A":
            shapes[f"{layer}.AG"], shapes[f"{layer}.G"] = (rank, d_in), gram_shape(d_in, settings.gram_alpha)
        else:
            shapes[f"{layer}.BS"], shapes[f"{layer}.S"] = (state[f"{layer}.lora_B"].shape[0], rank), (rank, rank)
    width = state["head.weight"].shape[1]
    shapes["head.WG"], shapes["head.nb"] = (head_rows, width), (head_rows,)
    shapes["head.G"] = gram_shape(width, settings.head_gram_alpha)
    return shapes


def task_end_shapes(state: TensorDict, settings: LoRMSettings) -> Shapes:
    """Names and shapes of the end-of-task Grams a client sends (``<layer>.G``)."""
    return {
        f"{key.removesuffix('.lora_A')}.G": gram_shape(state[key].shape[1], settings.gram_alpha)
        for key in state if key.endswith(".lora_A")
    }


class LoRM(FederatedStrategy):
    """Closed-form merging of one LoRA factor per round; Gram-weighted merging across tasks.

    Parameters
    ----------
    initial_state : the trainable state the run starts from.
    split : the run's task split (which head rows each task merges).
    scaling : the LoRA scaling ``s = alpha / rank``.
    seed : seeds each task's fresh adapter (with the task index).
    settings : :class:`LoRMSettings`.
    """

    secure_sum = "sum"

    def __init__(
        self, initial_state: TensorDict, split: TaskSplit, scaling: float, seed: int, settings: LoRMSettings = LoRMSettings()
    ) -> None:
        super().__init__(initial_state)
        self.split, self.scaling, self.seed, self.settings = split, scaling, seed, settings
        self.train_matrix, self.ridge = settings.train_matrix, settings.ridge
        self.layers = sorted(k.removesuffix(".lora_A") for k in initial_state if k.endswith(".lora_A"))
        self.task_sums: dict[str, tuple[torch.Tensor, Gram]] = {}  # layer -> (sum_t dW_t G_t, sum_t G_t)
        self.tasks_done = 0
        self.current_gram: dict[str, Gram] = {}
        self.task_finished = False
        self.task_adapters: list[TensorDict] = []  # every finished task's own factors (diagnostics, running-average Grams)

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> LoRM:
        return cls(initial_state, split, lora_scaling(cfg.lora), int(cfg.seed), LoRMSettings.from_config(cfg.method))

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        kind = plan.extra.get("statistics")
        if kind == ROUND_STATISTICS:
            return summary_shapes(plan.state, trained_factor(plan.train_groups), self.split.classes_per_task, self.settings)
        if kind == TASK_END_STATISTICS:
            return task_end_shapes(plan.state, self.settings)
        return super().expected_reply(plan, task)

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """A round's Grams ``G`` (A-rounds) or ``S`` (B-rounds) weigh ``AG`` / ``BS``, the head's ``G`` its
        ``WG``, ``nb`` is ``n_k b_k``; the end of a task's Grams weigh the finished adapter."""
        kind = plan.extra.get("statistics")
        if kind == TASK_END_STATISTICS:
            return WeightedSums({f"{layer}.G": () for layer in self.layers})
        if kind != ROUND_STATISTICS:
            return WeightedSums()
        gram, numerator = ("G", "AG") if trained_factor(plan.train_groups) == "lora_A" else ("S", "BS")
        grams = {f"{layer}.{gram}": (f"{layer}.{numerator}",) for layer in self.layers}
        return WeightedSums({**grams, "head.G": ("head.WG",)}, per_example=("head.nb",))

    @classmethod
    def client_reply(cls, method: Mapping[str, Any], client: ClientRound) -> TensorDict:
        """A round's summaries (:func:`client_summaries`) or the end of a task's Grams, sent as float32.

        Grams are taken after training, over every token of the client's current-task data;
        summaries are computed in float64.
        """
        settings, request = LoRMSettings.from_config(method), client.request
        kind = request.extra.get("statistics")
        if kind == ROUND_STATISTICS:
            grams = client.input_grams(settings.gram_alpha, settings.head_gram_alpha, settings.gram_passes)
            factor = trained_factor(request.train_groups)
            summaries = client_summaries(client.trained, grams, factor, client.task_classes, client.num_examples)
            return {key: value.float() for key, value in summaries.items()}
        if kind == TASK_END_STATISTICS:
            grams = client.input_grams(settings.gram_alpha, None, settings.gram_passes)
            return {f"{layer}.G": gram.float() for layer, gram in grams.items()}
        raise choices_error("statistics", kind, list(STATISTICS))

    def start_task(self, task: int) -> None:
        """A fresh adapter: B = 0 and A kaiming-uniform (PEFT's init), seeded by the task."""
        self.state = fresh_adapter(self.state, self.seed, task)
        self.current_gram, self.task_finished = {}, False

    def gram_model(self) -> tuple[TensorDict, dict[str, float]]:
        """The request's ``gram_base`` and extras that set the model the Grams are taken under.

        ``running_average`` in task ``t``: the finished tasks' own deltas ``s B_u A_u`` over ``t + 1`` as
        factors (``U = s [B_0 ... B_{t-1}] / (t + 1)``, ``V = [A_0; ...; A_{t-1}]``, rank ``t r``) and the
        trained adapter's weight ``1 / (t + 1)``. ``own``, or task 0: nothing (the trained model).
        """
        if self.settings.gram_model == "own" or not self.task_adapters:
            return {}, {}
        share = 1.0 / (len(self.task_adapters) + 1)
        base = {}
        for layer in self.layers:
            base[f"{layer}.U"] = share * self.scaling * torch.cat([a[f"{layer}.lora_B"] for a in self.task_adapters], dim=1)
            base[f"{layer}.V"] = torch.cat([a[f"{layer}.lora_A"] for a in self.task_adapters], dim=0)
        return base, {GRAM_ADAPTER_SCALE: share}

    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        factor = factor_of_round(self.train_matrix, round_in_task)
        gram_base, extra = self.gram_model()
        return RoundPlan(state=self.state, train_groups=(factor, "head"), extra={"statistics": ROUND_STATISTICS, **extra},
                         gram_base=gram_base)

    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        sums = sum_updates(updates, list(updates[0].tensors))
        factor = factor_of_round(self.train_matrix, round_in_task)
        for layer in self.layers:
            key = f"{layer}.{factor}"
            if factor == "lora_A":
                merged = merge_with_grams(sums[f"{layer}.AG"], sums[f"{layer}.G"], self.ridge)
                self.current_gram[layer] = sums[f"{layer}.G"]
            else:
                merged = merge_with_grams(sums[f"{layer}.BS"], sums[f"{layer}.S"], self.ridge)
            self.state[key] = merged.to(self.state[key].dtype)
        rows = self.split.task_classes(task)
        rows = slice(rows.start, rows.stop)
        weight, bias = self.state["head.weight"].clone(), self.state["head.bias"].clone()
        weight[rows] = merge_with_grams(sums["head.WG"], sums["head.G"], self.ridge).to(weight.dtype)
        bias[rows] = (sums["head.nb"] / sum(u.num_examples for u in updates)).to(bias.dtype)
        self.state["head.weight"], self.state["head.bias"] = weight, bias

    def task_end_plan(self, task: int) -> RoundPlan:
        gram_base, extra = self.gram_model()
        return RoundPlan(state=self.state, train_groups=(), extra={"statistics": TASK_END_STATISTICS, **extra},
                         gram_base=gram_base)

    def end_task(self, task: int, updates: list[ClientUpdate]) -> None:
        """Fold ``dW_t G_t`` and ``G_t`` of the finished task into the cross-task sums."""
        sums = sum_updates(updates, [f"{layer}.G" for layer in self.layers])
        self.task_sums = self._with_task({layer: sums[f"{layer}.G"] for layer in self.layers})
        self.task_adapters.append({k: v.clone() for k, v in self.state.items() if ".lora_" in k})
        self.tasks_done += 1
        self.task_finished = True

    def _with_task(self, grams: dict[str, Gram]) -> dict[str, tuple[torch.Tensor, Gram]]:
        """The cross-task sums with the current adapter added under the Grams ``grams``."""
        sums = {}
        for layer in self.layers:
            delta = self.scaling * self.state[f"{layer}.lora_B"].to(torch.float64) @ self.state[f"{layer}.lora_A"].to(torch.float64)
            weighted, gram = times_gram(delta, grams[layer]), grams[layer]
            if layer in self.task_sums:
                weighted, gram = weighted + self.task_sums[layer][0], gram + self.task_sums[layer][1]
            sums[layer] = (weighted, gram)
        return sums

    def _evaluated_sums(self) -> dict[str, tuple[torch.Tensor, Gram]]:
        if self.task_finished:
            return self.task_sums
        if self.current_gram:
            return self._with_task(self.current_gram)
        if self.task_sums:
            return self._with_task({layer: gram / self.tasks_done for layer, (_, gram) in self.task_sums.items()})
        return {}

    def base_deltas(self) -> TensorDict:
        return {
            layer: merge_with_grams(weighted, gram, self.ridge).to(torch.float32)
            for layer, (weighted, gram) in self._evaluated_sums().items()
        }

    def checkpoint(self) -> tuple[TensorDict, dict]:
        tensors, values = super().checkpoint()
        for layer, (weighted, gram) in self.task_sums.items():
            tensors[f"task_sums/{layer}.weighted"], tensors[f"task_sums/{layer}.gram"] = weighted, gram
        tensors.update({f"current_gram/{layer}": gram for layer, gram in self.current_gram.items()})
        for task, adapter in enumerate(self.task_adapters):
            tensors.update({f"task_adapter/{task}/{key}": value for key, value in adapter.items()})
        return tensors, {**values, "tasks_done": self.tasks_done, "task_finished": self.task_finished}

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.task_sums = {
            layer: (tensors[f"task_sums/{layer}.weighted"], tensors[f"task_sums/{layer}.gram"])
            for layer in self.layers if f"task_sums/{layer}.gram" in tensors
        }
        self.current_gram = {layer: tensors[f"current_gram/{layer}"] for layer in self.layers if f"current_gram/{layer}" in tensors}
        self.tasks_done, self.task_finished = int(values["tasks_done"]), bool(values["task_finished"])
        self.task_adapters = [
            {key.split("/", 2)[2]: value for key, value in tensors.items() if key.startswith(f"task_adapter/{task}/")}
            for task in range(self.tasks_done)
        ]

    def diagnostic_models(self) -> dict[str, list[tuple[TensorDict, TensorDict]]]:
        """``own_adapter``: each task with its own adapter live on ``W0`` (no cross-task merge) and the final head."""
        return {"own_adapter": [({**self.state, **adapter}, {}) for adapter in self.task_adapters]}

    def evaluation_state(self) -> TensorDict:
        """The head and, unless the adapter already sits in the merged base, the adapter."""
        if not self._evaluated_sums():
            return self.state
        return {k: torch.zeros_like(v) if k.endswith(".lora_B") else v for k, v in self.state.items()}
