"""Central differential privacy (``dp``): a trusted server noises each training round's average.

For the methods whose merge is an average of clipped updates (``fedavg_lora``, ``ffa_lora``,
``head_only``), with ``replies.clip_norm`` = C and ``replies.weighting=uniform``: after a
training round's merge, every trained entry of the new state gets Gaussian noise of
standard deviation ``z C / m`` (``z`` = ``dp.noise_multiplier``, ``m`` = the replies
averaged). Replacing one client's data changes the average of ``m`` updates clipped to C by
at most ``2 C / m``, so the noise is a Gaussian mechanism of multiplier ``z / 2`` under
replace-one adjacency, with ``m`` public; rounds sample a fixed number of clients without
replacement, which Flower's RDP accountant counts as such. docs/privacy.md has the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from omegaconf import DictConfig

from fedcil.protocol import ClientUpdate, TensorDict, param_group
from fedcil.settings import optional_float
from server_app.federation import sample_size

REPLACE_ONE_SENSITIVITY = 2.0
"""The average's L2 sensitivity under replace-one adjacency, in units of ``C / m``."""
NOISE_STREAM = 0x6470  # seeds the noise apart from the run's other random streams


class PrivacyBudgetSpent(RuntimeError):
    """The next training round would spend more than ``dp.max_epsilon``: the run stops, its last checkpoint kept."""


@cache
def spent_epsilon(noise_multiplier: float, sampled: int, population: int, delta: float, rounds: int) -> float:
    """ε at ``delta`` after ``rounds`` noised averages of ``sampled`` of ``population`` clients (Flower's RDP accountant)."""
    if rounds == 0:
        return 0.0
    accountant = RdpAccountant(
        PrivacyConfig(delta, population, NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT)
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY, sampled, population), rounds)
    return accountant.get_epsilon(delta)


@dataclass(frozen=True)
class CentralPrivacy:
    """The run's ``dp`` settings; disabled, it adds no noise, records nothing and never stops a run."""

    enabled: bool = False
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    delta: float = 0.0
    max_epsilon: float | None = None
    population: int = 1
    sampled: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CentralPrivacy:
        """From ``dp``, ``replies.clip_norm``, ``num_clients``, ``fraction_train`` and ``seed`` (checked by fedcil.settings)."""
        if not cfg.dp.enabled:
            return cls()
        return cls(True, float(cfg.dp.noise_multiplier), float(cfg.replies.clip_norm), float(cfg.dp.delta), optional_float(cfg.dp.max_epsilon),
                   int(cfg.num_clients), sample_size(cfg.fraction_train, cfg.num_clients), int(cfg.seed))

    def epsilon(self, rounds: int) -> float:
        """ε spent at ``delta`` once ``rounds`` training rounds are noised."""
        return spent_epsilon(self.noise_multiplier, self.sampled, self.population, self.delta, rounds)

    def check_budget(self, rounds: int, task: int, round_in_task: int) -> None:
        """Raise :class:`PrivacyBudgetSpent` if one more round after ``rounds`` would exceed ``max_epsilon``."""
        if not self.enabled or self.max_epsilon is None:
            return
        spent = self.epsilon(rounds + 1)
        if spent > self.max_epsilon:
            raise PrivacyBudgetSpent(
                f"task {task + 1} round {round_in_task + 1} would bring epsilon to {spent:.4g} > dp.max_epsilon="
                f"{self.max_epsilon:g} (delta={self.delta:g}); stopping (the checkpoint of the last finished round is kept)"
            )

    def noise(self, state: TensorDict, groups: tuple[str, ...], updates: list[ClientUpdate], task: int,
              round_in_task: int) -> TensorDict:
        """The entries of ``state`` in ``groups`` plus N(0, (z C / m)^2) each, ``m`` the replies averaged
        (those with weight); drawn from a generator seeded by (``seed``, ``task``, ``round_in_task``)."""
        if not self.enabled:
            return {}
        weights = {u.num_examples for u in updates if u.num_examples > 0}
        if len(weights) != 1:
            raise RuntimeError(f"dp needs a uniform average of the replies; their weights are {sorted(weights)}")
        std = self.noise_multiplier * self.clip_norm / sum(u.num_examples > 0 for u in updates)
        entropy = np.random.SeedSequence([NOISE_STREAM, self.seed, task, round_in_task]).generate_state(1, np.uint64)
        generator = torch.Generator().manual_seed(int(entropy[0]))
        noised = {}
        for key in sorted(k for k in state if param_group(k) in groups):
            noise = torch.randn(state[key].shape, generator=generator, dtype=torch.float64) * std
            noised[key] = (state[key].to(torch.float64) + noise.to(state[key].device)).to(state[key].dtype)
        return noised

    def record(self, rounds: int) -> dict[str, float]:
        """A round's ``epsilon`` and ``delta`` in results.json once ``rounds`` rounds are noised (nothing when disabled)."""
        return {"epsilon": self.epsilon(rounds), "delta": self.delta} if self.enabled else {}
