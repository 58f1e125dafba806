"""The interface every federated class-incremental method implements.

A strategy owns the server-side state of one method. For every round the ServerApp asks
it what to send (:meth:`FederatedStrategy.configure_round`), delivers the clients'
replies to :meth:`FederatedStrategy.aggregate_round`, and calls the task hooks around
each task (a method may ask every client for statistics once a task ends). The model it
evaluates is ``W0 + base_deltas()`` with the adapters and head of ``evaluation_state()``.
Strategies see tensors and numbers only, never Flower messages, so each one is testable
without Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from omegaconf import DictConfig

from fedcil.protocol import ClientUpdate, RoundPlan, TensorDict


class FederatedStrategy(ABC):
    """Base class: holds the global trainable state and the experiment config."""

    def __init__(self, cfg: DictConfig, initial_state: TensorDict) -> None:
        self.cfg = cfg
        self.state: TensorDict = {k: v.clone() for k, v in initial_state.items()}

    def start_task(self, task: int) -> None:
        """Hook called before the first round of ``task``."""

    @abstractmethod
    def configure_round(self, task: int, server_round: int) -> RoundPlan:
        """What to send to every sampled client in this round."""

    @abstractmethod
    def aggregate_round(self, task: int, server_round: int, updates: list[ClientUpdate]) -> None:
        """Merge the clients' replies into ``self.state``."""

    def task_end_plan(self, task: int) -> RoundPlan | None:
        """A statistics request sent to every client after the last round of ``task`` (none by default)."""
        return None

    def end_task(self, task: int, updates: list[ClientUpdate]) -> None:
        """Hook called after the last round of ``task``, with the replies to :meth:`task_end_plan`."""

    def evaluation_state(self) -> TensorDict:
        """The trainable state the server evaluates (default: the current global state)."""
        return self.state

    def base_deltas(self) -> TensorDict:
        """Per adapted layer, what the evaluated model adds to the frozen ``W0`` (none by default)."""
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
