"""Central differential privacy (``dp``): a trusted server noises each training round's average.

For the methods whose merge is an average of clipped updates (``fedavg_lora``, ``ffa_lora``,
``head_only``), with ``replies.clip_norm`` = C and ``replies.weighting=uniform``: after a
training round's merge, every trained entry of the new state gets Gaussian noise of
standard deviation ``z C / m`` (``z`` = ``dp.noise_multiplier``, ``m`` = the replies
averaged), drawn from the operating system's CSPRNG, so neither the run's seed nor its
outputs predict it. Replacing one client's data changes the average of ``m`` updates
clipped to C by at most ``2 C / m``: a Gaussian mechanism of multiplier ``z / 2`` under
replace-one adjacency, ``m`` public. With ``dp.secret_sampling`` a round's clients are a
secret sample (:func:`server_app.federation.sample_nodes` without a generator) and the
accountant credits amplification by sampling without replacement; without it, every
round counts as if every client took part. docs/privacy.md has the argument.
"""

from __future__ import annotations

import math
import os
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
NOISE_SOURCE = "os-csprng"
"""How results.json names where the noise comes from (:func:`os_gaussian`)."""


class PrivacyBudgetSpent(RuntimeError):
    """The next training round would spend more than ``dp.max_epsilon``: the run stops, its last checkpoint kept."""


def os_gaussian(count: int) -> np.ndarray:
    """``count`` independent N(0, 1) draws (float64) from the operating system's CSPRNG (``os.urandom``).

    Box–Muller on pairs of 64-bit uniforms: ``u1`` in (0, 1] (fine-grained near 0, so the radius
    reaches ``sqrt(128 ln 2)`` = 9.4), ``u2`` in [0, 1]; each pair gives two independent normals.
    """
    pairs = (count + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).astype(np.float64)
    u1, u2 = (words[:pairs] + 1.0) * 2.0**-64, words[pairs:] * 2.0**-64
    radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


@cache
def spent_epsilon(noise_multiplier: float, sampled: int, population: int, delta: float, rounds: int, amplified: bool) -> float:
    """ε at ``delta`` after ``rounds`` noised averages (Flower's RDP accountant): ``amplified``, each of a secret
    sample of ``sampled`` of ``population`` clients drawn without replacement; else each the Gaussian mechanism itself."""
    if rounds == 0:
        return 0.0
    # Flower takes replace-one only with sampling without replacement; a "sample" of the whole
    # population is the Gaussian mechanism itself (tests/test_privacy.py checks it against the formula).
    accountant = RdpAccountant(
        PrivacyConfig(delta, population, NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT)
    )
    event = GaussianPrivacyEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY, sampled if amplified else population, population)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


@dataclass(frozen=True)
class CentralPrivacy:
    """The run's ``dp`` settings; disabled, it adds no noise, records nothing, hides nothing and never stops a run."""

    enabled: bool = False
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    delta: float = 0.0
    max_epsilon: float | None = None
    population: int = 1
    sampled: int = 1
    secret_sampling: bool = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CentralPrivacy:
        """From ``dp``, ``replies.clip_norm``, ``num_clients`` and ``fraction_train`` (checked by fedcil.settings)."""
        if not cfg.dp.enabled:
            return cls()
        return cls(True, float(cfg.dp.noise_multiplier), float(cfg.replies.clip_norm), float(cfg.dp.delta),
                   optional_float(cfg.dp.max_epsilon), int(cfg.num_clients),
                   sample_size(cfg.fraction_train, cfg.num_clients), bool(cfg.dp.secret_sampling))

    @property
    def hides_sample(self) -> bool:
        """Whether rounds sample their clients in secret, keeping node identities out of results and checkpoints."""
        return self.enabled and self.secret_sampling

    @property
    def amplification(self) -> str:
        """What the accountant credits: ``secret sampling without replacement`` or ``none``."""
        return "secret sampling without replacement" if self.hides_sample and self.sampled < self.population else "none"

    def epsilon(self, rounds: int) -> float:
        """ε spent at ``delta`` once ``rounds`` training rounds are noised."""
        amplified = self.amplification != "none"
        return spent_epsilon(self.noise_multiplier, self.sampled, self.population, self.delta, rounds, amplified)

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

    def noise(self, state: TensorDict, groups: tuple[str, ...], updates: list[ClientUpdate]) -> TensorDict:
        """The entries of ``state`` in ``groups`` plus N(0, (z C / m)^2) each, ``m`` the replies averaged
        (those with weight); fresh draws from the OS CSPRNG (:func:`os_gaussian`) at every call."""
        if not self.enabled:
            return {}
        weights = {u.num_examples for u in updates if u.num_examples > 0}
        if len(weights) != 1:
            raise RuntimeError(f"dp needs a uniform average of the replies; their weights are {sorted(weights)}")
        std = self.noise_multiplier * self.clip_norm / sum(u.num_examples > 0 for u in updates)
        keys = sorted(k for k in state if param_group(k) in groups)
        draws = torch.from_numpy(os_gaussian(sum(state[k].numel() for k in keys))).split([state[k].numel() for k in keys])
        return {key: (state[key].to(torch.float64) + (d.view(state[key].shape) * std).to(state[key].device)).to(state[key].dtype)
                for key, d in zip(keys, draws)}

    def record(self, rounds: int) -> dict[str, float]:
        """A round's ``epsilon`` and ``delta`` in results.json once ``rounds`` rounds are noised (nothing when disabled)."""
        return {"epsilon": self.epsilon(rounds), "delta": self.delta} if self.enabled else {}

    def summary(self, rounds: int) -> dict:
        """results.json's ``dp`` after ``rounds`` noised rounds: where the noise comes from, that the run cannot be
        replayed, what the accountant credits, and ε without that credit (what holds against the clients, who
        know whether they were sampled: docs/privacy.md)."""
        if not self.enabled:
            return {}
        unamplified = spent_epsilon(self.noise_multiplier, self.sampled, self.population, self.delta, rounds, False)
        return {"noise": NOISE_SOURCE, "reproducible": False, "amplification": self.amplification,
                "sampled": self.sampled, "population": self.population, "epsilon_without_amplification": unamplified}
