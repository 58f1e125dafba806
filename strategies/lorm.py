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
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from fedcil.errors import choices_error
from fedcil.closed_form import Gram, merge_with_grams, sandwich, times_gram
from fedcil.model import lora_scaling
from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict
from fedcil.tasks import make_task_split
from strategies.aggregation import fresh_adapter, sum_updates
from strategies.base import FederatedStrategy

TRAIN_MATRICES = ("alt", "A", "B")
ROUND_STATISTICS = "lorm"
TASK_END_STATISTICS = "gram"


def factor_of_round(train_matrix: str, server_round: int) -> str:
    """``lora_B`` or ``lora_A``: the factor trained in ``server_round`` of a task."""
    if train_matrix == "alt":
        return "lora_B" if server_round % 2 == 0 else "lora_A"
    return f"lora_{train_matrix}"


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


def summary_shapes(state: TensorDict, factor: str, head_rows: int, method: DictConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of :func:`client_summaries` for a model with trainable ``state``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key in state:
        if not key.endswith(".lora_A"):
            continue
        layer = key.removesuffix(".lora_A")
        rank, d_in = state[key].shape
        if factor == "lora_A":
            shapes[f"{layer}.AG"], shapes[f"{layer}.G"] = (rank, d_in), gram_shape(d_in, float(method.gram_alpha))
        else:
            shapes[f"{layer}.BS"], shapes[f"{layer}.S"] = (state[f"{layer}.lora_B"].shape[0], rank), (rank, rank)
    width = state["head.weight"].shape[1]
    shapes["head.WG"], shapes["head.nb"] = (head_rows, width), (head_rows,)
    shapes["head.G"] = gram_shape(width, float(method.head_gram_alpha))
    return shapes


def task_end_shapes(state: TensorDict, method: DictConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the end-of-task Grams a client sends (``<layer>.G``)."""
    return {
        f"{key.removesuffix('.lora_A')}.G": gram_shape(state[key].shape[1], float(method.gram_alpha))
        for key in state if key.endswith(".lora_A")
    }


class LoRM(FederatedStrategy):
    """Closed-form merging of one LoRA factor per round; Gram-weighted merging across tasks.

    Parameters (``cfg.method``)
    ----------
    train_matrix : ``alt`` (B, A, B, ...), ``A`` or ``B``: the factor each round trains.
    gram_alpha : ``a`` of the adapted backbone layers' Grams (0: diagonal only).
    head_gram_alpha : ``a`` of the head's Gram.
    ridge : relative ridge of every solve, ``eps = ridge * mean(diag(G))``.
    """

    def __init__(self, cfg: DictConfig, initial_state: TensorDict) -> None:
        super().__init__(cfg, initial_state)
        self.train_matrix = str(cfg.method.train_matrix)
        if self.train_matrix not in TRAIN_MATRICES:
            raise choices_error("method.train_matrix", self.train_matrix, list(TRAIN_MATRICES))
        self.ridge = float(cfg.method.ridge)
        self.scaling = lora_scaling(cfg.lora)
        num_classes = initial_state["head.weight"].shape[0]
        self.split = make_task_split(num_classes, cfg.num_tasks, cfg.classes_per_task, cfg.class_order, cfg.seed)
        self.layers = sorted(k.removesuffix(".lora_A") for k in initial_state if k.endswith(".lora_A"))
        self.task_sums: dict[str, tuple[torch.Tensor, Gram]] = {}  # layer -> (sum_t dW_t G_t, sum_t G_t)
        self.tasks_done = 0
        self.current_gram: dict[str, Gram] = {}
        self.task_finished = False

    def start_task(self, task: int) -> None:
        """A fresh adapter: B = 0 and A kaiming-uniform (PEFT's init), seeded by the task."""
        self.state = fresh_adapter(self.state, int(self.cfg.seed), task)
        self.current_gram, self.task_finished = {}, False

    def configure_round(self, task: int, server_round: int) -> RoundPlan:
        factor = factor_of_round(self.train_matrix, server_round)
        return RoundPlan(state=self.state, train_groups=(factor, "head"), extra={"statistics": ROUND_STATISTICS})

    def aggregate_round(self, task: int, server_round: int, updates: list[ClientUpdate]) -> None:
        sums = sum_updates(updates, list(updates[0].tensors))
        factor = factor_of_round(self.train_matrix, server_round)
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
        return RoundPlan(state=self.state, train_groups=(), extra={"statistics": TASK_END_STATISTICS})

    def end_task(self, task: int, updates: list[ClientUpdate]) -> None:
        """Fold ``dW_t G_t`` and ``G_t`` of the finished task into the cross-task sums."""
        sums = sum_updates(updates, [f"{layer}.G" for layer in self.layers])
        self.task_sums = self._with_task({layer: sums[f"{layer}.G"] for layer in self.layers})
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
        return tensors, {**values, "tasks_done": self.tasks_done, "task_finished": self.task_finished}

    def restore(self, tensors: TensorDict, values: dict) -> None:
        super().restore(tensors, values)
        self.task_sums = {
            layer: (tensors[f"task_sums/{layer}.weighted"], tensors[f"task_sums/{layer}.gram"])
            for layer in self.layers if f"task_sums/{layer}.gram" in tensors
        }
        self.current_gram = {layer: tensors[f"current_gram/{layer}"] for layer in self.layers if f"current_gram/{layer}" in tensors}
        self.tasks_done, self.task_finished = int(values["tasks_done"]), bool(values["task_finished"])

    def evaluation_state(self) -> TensorDict:
        """The head and, unless the adapter already sits in the merged base, the adapter."""
        if not self._evaluated_sums():
            return self.state
        return {k: torch.zeros_like(v) if k.endswith(".lora_B") else v for k, v in self.state.items()}
