"""Central differential privacy (``dp``): the noise's scale, the accountant, whole runs, the budget stop, the checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcil.checkpoint import compared, load_checkpoint
from fedcil.cli.inprocess import run_inprocess
from fedcil.config import compose_config, to_container
from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate
from fedcil.settings import check_settings
from server_app.federation import RoundExchange
from server_app.loop import train_round
from server_app.privacy import CentralPrivacy, PrivacyBudgetSpent
from strategies import method_class

DP = ["method=fedavg_lora", "replies.clip_norm=1.0", "replies.weighting=uniform", "dp.enabled=true"]
TINY = ["num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=1", "partition=iid",
        "train_per_class=20", "test_per_class=10", "eval_every_round=false", *DP]
RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def privacy(z: float = 1.5, clip: float = 2.0, delta: float = 1e-5, sampled: int = 10, population: int = 10,
            budget: float | None = None) -> CentralPrivacy:
    return CentralPrivacy(True, z, clip, delta, budget, population, sampled, seed=0)


def replies(m: int, tensors: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    """``m`` replies of equal weight carrying ``tensors``."""
    return [ClientUpdate(node, dict(tensors), num_examples=7, loss=0.0) for node in range(m)]


# (a) the noise


def test_the_noise_on_a_zero_average_has_mean_zero_and_std_z_c_over_m():
    z, clip, m = 1.5, 2.0, 4
    state = {"blocks.0.attn.qkv.lora_A": torch.zeros(300, 200), "blocks.0.attn.qkv.lora_B": torch.zeros(200, 300),
             "head.weight": torch.zeros(10, 64)}
    draws = [privacy(z, clip).noise(state, ("lora_A", "lora_B", "head"), replies(m, state), 0, r) for r in range(5)]
    values = torch.cat([t.flatten().double() for d in draws for t in d.values()])
    n, sigma = values.numel(), z * clip / m
    # The sample std of n Gaussian draws has a standard error of sigma / sqrt(2 n), the mean sigma / sqrt(n):
    # 6 standard errors (0.4% and 0.6% of sigma here) fail once in about 10^9 runs; a noise of std z C
    # (no 1/m) or z C / (m - 1) is 33% and more off.
    assert abs(float(values.std()) - sigma) < 6 * sigma / math.sqrt(2 * n)
    assert abs(float(values.mean())) < 6 * sigma / math.sqrt(n)
    assert not torch.equal(draws[0]["head.weight"], draws[1]["head.weight"])  # a fresh draw every round


def test_the_noise_is_reproducible_touches_only_the_trained_groups_and_needs_a_uniform_average():
    state = {"blocks.0.attn.qkv.lora_A": torch.ones(4, 8), "head.weight": torch.ones(3, 8)}
    again = privacy().noise(state, ("head",), replies(3, state), 1, 2)
    assert list(again) == ["head.weight"]
    assert torch.equal(again["head.weight"], privacy().noise(state, ("head",), replies(3, state), 1, 2)["head.weight"])
    assert CentralPrivacy().noise(state, ("head",), replies(3, state), 1, 2) == {}
    unequal = [*replies(2, state), ClientUpdate(9, state, num_examples=50, loss=0.0)]
    with pytest.raises(RuntimeError, match=r"uniform average of the replies; their weights are \[7, 50\]"):
        privacy().noise(state, ("head",), unequal, 0, 0)


def test_a_training_round_adds_the_noise_to_the_merged_state():
    """train_round with dp: replies equal to the sent state average to it; what is left is the noise."""
    cfg = compose_config("config", [*TINY, "dp.noise_multiplier=2.0", "replies.clip_norm=0.5"])
    initial = {"blocks.0.attn.qkv.lora_A": torch.zeros(64, 64), "head.weight": torch.zeros(20, 64)}
    strategy = method_class("fedavg_lora")(initial)

    def send(plan, task, round_in_task, nodes):
        return RoundExchange([], 0, 0, nodes, updates=replies(len(nodes), plan.state))

    train_round(send, cfg, strategy, [0, 1, 2], np.random.default_rng(0), 0, 0, CentralPrivacy.from_config(cfg))
    values = torch.cat([t.flatten().double() for t in strategy.state.values()])
    sigma = 2.0 * 0.5 / 3
    assert abs(float(values.std()) - sigma) < 6 * sigma / math.sqrt(2 * values.numel())


# (b) the accountant


def gaussian_epsilon(z: float, rounds: int, delta: float) -> tuple[float, float]:
    """Independently: T replace-one Gaussian releases of sensitivity 2 C / m and std z C / m have RDP
    T alpha 2^2 / (2 z^2) at order alpha; (epsilon, delta) by the conversion of Canonne, Kamath and Steinke
    (2020, Prop. 12) and by the classic one (Mironov 2017, Prop. 3), minimised over the same orders."""
    rdp = [(a, rounds * a * 2.0**2 / (2 * z**2)) for a in RDP_ORDERS]
    improved = min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a, r in rdp if a > 1.01)
    classic = min(r + math.log(1 / delta) / (a - 1) for a, r in rdp)
    return improved, classic


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 1, 1e-5), (2.0, 6, 1e-5), (4.0, 50, 1e-6), (10.0, 300, 1e-3)])
def test_epsilon_without_sampling_equals_the_composed_gaussian_mechanism(z, rounds, delta):
    improved, classic = gaussian_epsilon(z, rounds, delta)
    spent = privacy(z, delta=delta, sampled=10, population=10).epsilon(rounds)
    assert spent == pytest.approx(improved, rel=1e-9)
    assert spent <= classic
    rho = rounds * 2 / z**2  # zCDP of the same composition: epsilon <= rho + 2 sqrt(rho log(1/delta))
    assert spent <= rho + 2 * math.sqrt(rho * math.log(1 / delta)) + 1e-9


def test_epsilon_grows_with_rounds_falls_with_the_noise_and_with_sampling():
    by_rounds = [privacy(2.0).epsilon(t) for t in range(6)]
    assert by_rounds[0] == 0.0 and all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_noise = [privacy(z).epsilon(5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    assert privacy(2.0, sampled=2, population=20).epsilon(5) < privacy(2.0, sampled=20, population=20).epsilon(5)


def test_the_budget_stops_the_round_that_would_exceed_it():
    dp = privacy(2.0, budget=None)
    budget = (dp.epsilon(2) + dp.epsilon(3)) / 2
    limited = privacy(2.0, budget=budget)
    limited.check_budget(1, 0, 1)  # a second round stays within
    with pytest.raises(PrivacyBudgetSpent, match=r"^task 1 round 3 would bring epsilon to [0-9.]+ > dp.max_epsilon="):
        limited.check_budget(2, 0, 2)
    dp.check_budget(10_000, 0, 0)  # no budget: never stops


# (c, d) whole runs: epsilon per round, the budget stop, resuming with a larger budget


def test_a_dp_run_stops_at_its_budget_and_resumes_with_a_larger_one_equal_to_an_uninterrupted_run(tmp_path):
    large = "dp.max_epsilon=1000"
    whole = run_inprocess(compose_config("config", [*TINY, large, f"output_dir={tmp_path / 'whole'}"]))
    dp = CentralPrivacy.from_config(compose_config("config", TINY))
    epsilons = [r["epsilon"] for r in whole["rounds"]]
    assert epsilons == [dp.epsilon(t) for t in range(1, 5)] and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert (whole["epsilon"], whole["delta"]) == (epsilons[-1], 1e-5)
    assert all(r["delta"] == 1e-5 for r in whole["rounds"])

    budget = f"dp.max_epsilon={(dp.epsilon(2) + dp.epsilon(3)) / 2}"
    with pytest.raises(PrivacyBudgetSpent, match="task 2 round 1 would bring epsilon"):
        run_inprocess(compose_config("config", [*TINY, budget, f"output_dir={tmp_path / 'run'}"]))
    checkpoint, _ = load_checkpoint(tmp_path / "run", to_container(compose_config("config", [*TINY, budget])))
    assert (checkpoint.task, checkpoint.round_in_task, len(checkpoint.rounds)) == (0, 1, 2)

    resumed_cfg = compose_config("config", [*TINY, large, f"resume={tmp_path / 'run'}", f"output_dir={tmp_path / 'run'}"])
    resumed = run_inprocess(resumed_cfg)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [(r["loss"], r["epsilon"]) for r in resumed["rounds"]] == [(r["loss"], r["epsilon"]) for r in whole["rounds"]]
    _, final = load_checkpoint(tmp_path / "run", to_container(resumed_cfg))
    _, reference = load_checkpoint(tmp_path / "whole", to_container(resumed_cfg))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_resume_may_raise_the_budget_only():
    config = {"seed": 0, "resume": "/a", "dp": {"enabled": True, "max_epsilon": 3.0, "noise_multiplier": 1.0}}
    assert compared(config) == {"seed": 0, "dp": {"enabled": True, "noise_multiplier": 1.0}}


# (e) settings


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=lorm", "replies.clip_norm=null"], "dp.enabled=true with method=lorm; allowed methods: fedavg_lora, ffa_lora, head_only"),
    (["method=fedex_lora"], "dp.enabled=true with method=fedex_lora; allowed methods:"),
    (["replies.clip_norm=null"], "dp.enabled=true needs replies.clip_norm"),
    (["replies.weighting=capped"], "dp.enabled=true with replies.weighting=capped; allowed: uniform"),
    (["secagg.enabled=true"], "dp.enabled=true with secagg.enabled=true; allowed: one of them"),
    (["dp.delta=0.5"], r"dp.delta=0.5 with num_clients=3; allowed: below 1/num_clients=0.333"),
    (["dp.delta=0"], r"dp.delta=0 is out of range; allowed: a number > 0 and < 1"),
    (["dp.noise_multiplier=0"], r"dp.noise_multiplier=0 is out of range; allowed: a number > 0"),
    (["dp.max_epsilon=-1"], r"dp.max_epsilon=-1 is out of range; allowed: a number > 0 or null"),
    (["dp.enabled=maybe"], r"unknown dp.enabled 'maybe'; valid choices: false, true"),
])
def test_bad_dp_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_settings(compose_config("config", [*TINY, *overrides]))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["fedavg_lora", "ffa_lora", "head_only"])
def test_the_averaging_methods_take_dp(method):
    check_settings(compose_config("config", [*TINY, f"method={method}"]))
