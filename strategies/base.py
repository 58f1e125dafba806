"""The interface every federated class-incremental method implements.

A strategy owns one method's server-side state *and* declares its message protocol, so
that a method lives in one module:

- what a round asks for: :meth:`FederatedStrategy.configure_round` (and, once a task ends,
  :meth:`FederatedStrategy.task_end_plan`) return a :class:`~fedcil.protocol.RoundPlan`;
- what a valid reply carries: :meth:`FederatedStrategy.expected_reply` gives the names and
  shapes the server's validation checks every reply against;
- what a client computes after local training: :meth:`FederatedStrategy.client_reply`, a
  class method the ClientApp calls with a :class:`ClientRound`.

The ServerApp loop delivers the valid replies to :meth:`FederatedStrategy.aggregate_round`
(or :meth:`FederatedStrategy.end_task`) and evaluates ``W0 + base_deltas()`` with the
adapters and head of ``evaluation_state()``. Strategies see tensors and numbers only,
never Flower messages, and are built from typed arguments (:meth:`from_config` reads the
Hydra config), so each one is testable without Flower or Hydra. Rounds are counted within
a task from 0 (``round_in_task``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedcil.closed_form import Gram
from fedcil.protocol import (
    EVAL_COUNT, EVAL_CORRECT, ClientUpdate, RoundPlan, Shapes, TensorDict, TrainRequest, WeightedSums, param_group,
)
from fedcil.tasks import TaskSplit

if TYPE_CHECKING:
    from omegaconf import DictConfig


def lora_scaling(lora_cfg: Mapping[str, Any]) -> float:
    """PEFT's LoRA scaling ``alpha / r``: a layer computes ``W0 x + scaling * B A x``."""
    return float(lora_cfg["alpha"]) / int(lora_cfg["rank"])


InputGrams = Callable[..., dict[str, Gram]]
"""``input_grams(layer_alpha, head_alpha, passes=1)``: the regularised Grams of every adapted
layer's inputs over the client's current-task data (and of the head's, under ``head``, unless
``head_alpha`` is None), averaged over ``passes`` passes of fresh augmented views, under the
request's Gram model (:class:`~fedcil.protocol.RoundPlan`'s ``gram_base``)."""


HeadFeatures = Callable[[bool], "tuple[torch.Tensor, torch.Tensor]"]
"""``head_features(raw)``: what the head sees for each of the client's current-task images
(``n x d`` float64; with ``raw``, the features before the model's standardiser and random
feature map) and their labels (the task split's numbering)."""


@dataclass(frozen=True)
class ClientRound:
    """What a method's client hook sees once a client's local training is done."""

    request: TrainRequest
    trained: TensorDict  # the client's whole trainable state after training
    num_examples: int
    task_classes: range  # the labels (head rows) of the request's task
    input_grams: InputGrams
    head_features: HeadFeatures


class FederatedStrategy(ABC):
    """Base class: holds the global trainable state.

    ``trains_masked_head``: clients train with the cross-entropy masked to their task's
    classes (every method but ``analytic``), which needs at least 2 classes per task.
    """

    trains_masked_head = True
    secure_sum: str | None = None
    """How replies add up under secure aggregation (``secagg``): ``sum`` (the merge needs only
    the sum of the replies), ``mean`` (a sample-weighted mean: clients send ``n_k * T_k``),
    or None (the merge needs each client's reply: no secure aggregation)."""

    def __init__(self, initial_state: TensorDict) -> None:
        self.state: TensorDict = {k: v.clone() for k, v in initial_state.items()}

    @classmethod
    def from_config(cls, cfg: DictConfig, split: TaskSplit, initial_state: TensorDict) -> FederatedStrategy:
        """The strategy for a run of ``cfg`` (methods with settings read theirs here)."""
        return cls(initial_state)

    def start_task(self, task: int) -> None:
        """Hook called before the first round of ``task``."""

    @abstractmethod
    def configure_round(self, task: int, round_in_task: int) -> RoundPlan:
        """What to send to every sampled client in this round."""

    @abstractmethod
    def aggregate_round(self, task: int, round_in_task: int, updates: list[ClientUpdate]) -> None:
        """Merge the clients' (validated) replies into ``self.state``."""

    def task_end_plan(self, task: int) -> RoundPlan | None:
        """A statistics request sent to every client after the last round of ``task`` (none by default)."""
        return None

    def end_task(self, task: int, updates: list[ClientUpdate]) -> None:
        """Hook called after the last round of ``task``, with the replies to :meth:`task_end_plan`."""

    def expected_reply(self, plan: RoundPlan, task: int) -> Shapes:
        """Names and shapes of the tensors a valid reply to ``plan`` in ``task`` carries.

        Evaluation counts (one entry per task seen) or the trained tensors of the plan's
        groups; a method that asks for statistics extends this.
        """
        if plan.evaluates:
            return {EVAL_CORRECT: (task + 1,), EVAL_COUNT: (task + 1,)}
        if plan.returns_trained_tensors:
            return {k: tuple(v.shape) for k, v in plan.state.items() if param_group(k) in plan.train_groups}
        raise ValueError(f"{type(self).__name__} asks for no statistics, got {plan.extra.get('statistics')!r}")

    @classmethod
    def client_reply(cls, method: Mapping[str, Any], client: ClientRound) -> TensorDict:
        """What a client sends back after local training (run by the ClientApp).

        ``method`` is the run's method settings. By default: the trained tensors of the
        requested groups; a method that asks for statistics computes them here.
        """
        return {k: v for k, v in client.trained.items() if param_group(k) in client.request.train_groups}

    def weighted_sums(self, plan: RoundPlan) -> WeightedSums:
        """Which tensors of a reply to ``plan`` carry its weight besides ``num-examples``: its Grams
        (with the numerators pre-multiplied by each) and its ``n_k``-scaled tensors. The server's
        influence bounds (:mod:`server_app.influence`) check and scale them. None by default."""
        return WeightedSums()

    def record(self) -> dict:
        """JSON-able values of the latest merge for the round's entry of ``results.json`` (none by default)."""
        return {}

    def evaluation_state(self) -> TensorDict:
        """The trainable state the server evaluates (default: the current global state)."""
        return self.state

    def base_deltas(self) -> TensorDict:
        """Per adapted layer, what the evaluated model adds to the frozen ``W0`` (none by default)."""
        return {}

    def diagnostic_models(self) -> dict[str, list[tuple[TensorDict, TensorDict]]]:
        """Other models to evaluate once the last task is done, for the results' ``diagnostics``.

        Per name, one ``(trainable state, base deltas)`` per task, scored on that task's test
        samples (none by default).
        """
        return {}

    def evaluation_plan(self) -> RoundPlan:
        """The request asking clients to evaluate the evaluated model on their test shards."""
        base = {f"{layer}.delta": delta for layer, delta in self.base_deltas().items()}
        return RoundPlan(state=self.evaluation_state(), train_groups=(), extra={"evaluate": True}, base=base)

    def checkpoint(self) -> tuple[TensorDict, dict]:
        """Everything needed to go on after a restart: named tensors and JSON-able values.

        Subclasses with more server state extend both this and :meth:`restore`.
        """
        return {f"state/{k}": v for k, v in self.state.items()}, {}

    def restore(self, tensors: TensorDict, values: dict) -> None:
        """Take back what :meth:`checkpoint` returned (on a strategy built from the same config)."""
        self.state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
