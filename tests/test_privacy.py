"""Central differential privacy (``dp``): the noise (its source, its law, the seed attack), the accountant
with and without amplification, secret sampling, whole runs, the budget stop, the checks.

Statistical checks are two-sided tests at a fixed false-alarm rate ``ALPHA`` = 1e-6 each
(:func:`assert_standard_gaussian` makes three: at most 3e-6 per call, by the union bound)."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import MessageType
from hypothesis import given, settings, strategies as st
from scipy import stats

from fedcil.checkpoint import compared, load_checkpoint
from fedcil.cli.inprocess import inprocess_post, run_inprocess
from fedcil.config import compose_config, to_container
from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate
from fedcil.settings import check_settings
from server_app.federation import RoundExchange, sample_nodes
from server_app.loop import round_record, run_rounds, train_round
from server_app.privacy import CentralPrivacy, PrivacyBudgetSpent, os_gaussian
from strategies import method_class

DP = ["method=fedavg_lora", "replies.clip_norm=1.0", "replies.weighting=uniform", "replies.update_factor=null", "dp.enabled=true"]
TINY = ["num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=1", "partition=iid",
        "train_per_class=20", "test_per_class=10", "eval_every_round=false", *DP]
RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
ALPHA = 1e-6
OLD_NOISE_STREAM = 0x6470  # the seeding of the noise before it came from the OS: (stream, seed, task, round)


def privacy(z: float = 1.5, clip: float = 2.0, delta: float = 1e-5, sampled: int = 10, population: int = 10,
            budget: float | None = None, secret: bool = True) -> CentralPrivacy:
    return CentralPrivacy(True, z, clip, delta, budget, population, sampled, secret)


def replies(m: int, tensors: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    """``m`` replies of equal weight carrying ``tensors``."""
    return [ClientUpdate(node, dict(tensors), num_examples=7, loss=0.0) for node in range(m)]


def assert_standard_gaussian(values: torch.Tensor) -> None:
    """``values`` are i.i.d. N(0, 1): the variance (chi-square on the sum of squares, the mean known), the mean
    (z-test) and the law (Kolmogorov-Smirnov), each two-sided at ``ALPHA``."""
    x = values.double().flatten().numpy()
    n = x.size
    squares = float(np.sum(x**2))
    assert stats.chi2.ppf(ALPHA / 2, n) < squares < stats.chi2.isf(ALPHA / 2, n), f"variance {squares / n:.5f}, not 1"
    assert abs(float(x.mean())) * math.sqrt(n) < stats.norm.isf(ALPHA / 2), f"mean {x.mean():.5f}, not 0"
    assert stats.kstest(x, "norm").pvalue > ALPHA


ZERO_STATE = {"blocks.0.attn.qkv.lora_A": torch.zeros(64, 64), "head.weight": torch.zeros(20, 64)}


def dp_round(cfg, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One noised FedAvg-LoRA training round (task 0, round 0, seeded sampling) whose replies all equal the
    sent state, so that the un-noised average is ``initial``: the state published after it."""
    strategy = method_class("fedavg_lora")(initial)

    def send(plan, task, round_in_task, nodes):
        return RoundExchange([], 0, 0, nodes, updates=replies(len(nodes), plan.state))

    train_round(send, cfg, strategy, [0, 1, 2], np.random.default_rng(cfg.seed), 0, 0, CentralPrivacy.from_config(cfg))
    return strategy.state


# (a) the noise


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2001))
def test_os_gaussian_gives_as_many_finite_draws_as_asked(count):
    draws = os_gaussian(count)
    assert draws.shape == (count,) and draws.dtype == np.float64 and np.isfinite(draws).all()


def test_os_gaussian_draws_are_standard_normal_and_the_two_of_a_pair_independent():
    draws = os_gaussian(200_000)
    assert_standard_gaussian(torch.from_numpy(draws))
    cosines, sines = draws[:100_000], draws[100_000:]  # the two outputs of each Box-Muller pair
    # Independent N(0, 1) pairs: the correlation of x with y and of x^2 with y^2 is 0, with a standard error
    # of 1/sqrt(n) (both asymptotically normal); a wrong transform (y = x, a shared radius without an angle) fails.
    bound = stats.norm.isf(ALPHA / 2) / math.sqrt(cosines.size)
    assert abs(np.corrcoef(cosines, sines)[0, 1]) < bound
    assert abs(np.corrcoef(cosines**2, sines**2)[0, 1]) < bound


def test_the_noise_on_a_zero_average_is_gaussian_with_std_z_c_over_m():
    z, clip, m = 1.5, 2.0, 4
    state = {"blocks.0.attn.qkv.lora_A": torch.zeros(300, 200), "blocks.0.attn.qkv.lora_B": torch.zeros(200, 300),
             "head.weight": torch.zeros(10, 64)}
    noised = privacy(z, clip).noise(state, ("lora_A", "lora_B", "head"), replies(m, state))
    # A noise of std z C (no 1/m) or z C / (m - 1) is 33% and more off; the test sees 1% (n = 120,640).
    assert_standard_gaussian(torch.cat([t.flatten() for t in noised.values()]) / (z * clip / m))


def test_the_noise_touches_only_the_trained_groups_and_needs_a_uniform_average():
    state = {"blocks.0.attn.qkv.lora_A": torch.ones(4, 8), "head.weight": torch.ones(3, 8)}
    noised = privacy().noise(state, ("head",), replies(3, state))
    assert list(noised) == ["head.weight"] and noised["head.weight"].dtype == torch.float32
    assert CentralPrivacy().noise(state, ("head",), replies(3, state)) == {}
    unequal = [*replies(2, state), ClientUpdate(9, state, num_examples=50, loss=0.0)]
    with pytest.raises(RuntimeError, match=r"uniform average of the replies; their weights are \[7, 50\]"):
        privacy().noise(state, ("head",), unequal)


def test_a_training_round_adds_the_noise_to_the_merged_state():
    """train_round with dp: replies equal to the sent state average to it; what is left is the noise."""
    cfg = compose_config("config", [*TINY, "dp.noise_multiplier=2.0", "replies.clip_norm=0.5"])
    published = dp_round(cfg, ZERO_STATE)
    assert_standard_gaussian(torch.cat([t.flatten() for t in published.values()]) / (2.0 * 0.5 / 3))


def test_two_rounds_with_the_same_seed_task_and_round_draw_independent_noise():
    """The issue's two runs with one seed: their published states used to differ by no noise at all."""
    cfg = compose_config("config", [*TINY, "dp.noise_multiplier=2.0", "replies.clip_norm=0.5"])
    first, second = dp_round(cfg, ZERO_STATE), dp_round(cfg, ZERO_STATE)
    difference = torch.cat([(first[k].double() - second[k].double()).flatten() for k in first])
    assert_standard_gaussian(difference / (math.sqrt(2) * 2.0 * 0.5 / 3))  # two independent draws of std z C / m


def test_an_observer_who_knows_the_seed_cannot_rebuild_and_subtract_the_noise():
    """The issue's attack: rebuild the noise from (seed, task, round) as it used to be drawn, subtract it from
    the published state. That returned the un-noised average to float32 rounding (1.2e-7); now what is left
    is the noise itself, independent of the rebuilt draw (std sqrt(2) z C / m)."""
    cfg = compose_config("config", [*TINY, "dp.noise_multiplier=2.0", "replies.clip_norm=0.5"])
    initial = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in ZERO_STATE.items()}
    published = dp_round(cfg, initial)
    sigma = 2.0 * 0.5 / 3
    entropy = np.random.SeedSequence([OLD_NOISE_STREAM, cfg.seed, 0, 0]).generate_state(1, np.uint64)
    generator = torch.Generator().manual_seed(int(entropy[0]))
    residual = torch.cat([
        (published[k].double() - torch.randn(published[k].shape, generator=generator, dtype=torch.float64) * sigma
         - initial[k].double()).flatten()
        for k in sorted(published)
    ])
    assert_standard_gaussian(residual / (math.sqrt(2) * sigma))


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


def amplified_epsilon(z: float, sampled: int, population: int, rounds: int, delta: float) -> float:
    """Google's dp-accounting directly (no Flower): ``rounds`` replace-one Gaussian releases of multiplier
    ``z / 2``, each on a sample of ``sampled`` of ``population`` drawn without replacement."""
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, dp_accounting.GaussianDpEvent(z / 2))
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("z", "sampled", "population", "rounds"), [(1.0, 3, 10, 5), (2.0, 5, 20, 40), (4.0, 10, 100, 300)])
def test_a_secret_sample_is_credited_amplification_and_a_public_one_is_not(z, sampled, population, rounds):
    secret = privacy(z, sampled=sampled, population=population, secret=True)
    public = privacy(z, sampled=sampled, population=population, secret=False)
    assert (secret.amplification, public.amplification) == ("secret sampling without replacement", "none")
    assert secret.epsilon(rounds) == pytest.approx(amplified_epsilon(z, sampled, population, rounds, 1e-5), rel=1e-9)
    # The public sample's epsilon is the composed Gaussian mechanism, as if every client took part every round.
    assert public.epsilon(rounds) == pytest.approx(gaussian_epsilon(z, rounds, 1e-5)[0], rel=1e-9)
    assert secret.epsilon(rounds) < public.epsilon(rounds)
    assert privacy(z, sampled=population, population=population).amplification == "none"  # nothing sampled away


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


# (c, d) whole runs: epsilon per round, the budget stop, resuming with a larger budget, secret sampling


def test_a_dp_run_stops_at_its_budget_and_resumes_with_a_larger_one_and_fresh_noise(tmp_path):
    large = "dp.max_epsilon=1000"
    whole = run_inprocess(compose_config("config", [*TINY, large, f"output_dir={tmp_path / 'whole'}"]))
    dp = CentralPrivacy.from_config(compose_config("config", TINY))
    epsilons = [r["epsilon"] for r in whole["rounds"]]
    assert epsilons == [dp.epsilon(t) for t in range(1, 5)] and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert (whole["epsilon"], whole["delta"]) == (epsilons[-1], 1e-5)
    assert whole["dp"] == {"noise": "os-csprng", "reproducible": False, "amplification": "none", "sampled": 3,
                           "population": 3, "epsilon_without_amplification": epsilons[-1]}
    assert all(r["delta"] == 1e-5 and r["loss"] is None for r in whole["rounds"])  # the clients' loss is not noised

    budget = f"dp.max_epsilon={(dp.epsilon(2) + dp.epsilon(3)) / 2}"
    with pytest.raises(PrivacyBudgetSpent, match="task 2 round 1 would bring epsilon"):
        run_inprocess(compose_config("config", [*TINY, budget, f"output_dir={tmp_path / 'run'}"]))
    checkpoint, _ = load_checkpoint(tmp_path / "run", to_container(compose_config("config", [*TINY, budget])))
    assert (checkpoint.task, checkpoint.round_in_task, len(checkpoint.rounds)) == (0, 1, 2)

    resumed_cfg = compose_config("config", [*TINY, large, f"resume={tmp_path / 'run'}", f"output_dir={tmp_path / 'run'}"])
    resumed = run_inprocess(resumed_cfg)
    assert resumed["rounds"][:2] == checkpoint.rounds  # the accountant's state: the rounds already noised
    assert [r["epsilon"] for r in resumed["rounds"]] == epsilons
    _, final = load_checkpoint(tmp_path / "run", to_container(resumed_cfg))
    _, reference = load_checkpoint(tmp_path / "whole", to_container(resumed_cfg))
    assert final.keys() == reference.keys()
    assert not any(torch.equal(final[k], reference[k]) for k in reference if k.startswith("state/"))  # new noise


SAMPLED = ["num_clients=6", "fraction_train=0.5", "rounds_per_task=3"]  # 3 of 6 clients, 6 rounds


@pytest.mark.parametrize("secret", [True, False])
def test_a_secret_sample_is_neither_predictable_from_the_seed_nor_recorded(tmp_path, secret):
    """The issue's accounting attack: the rounds' samples followed from ``default_rng(seed)`` (its state in every
    checkpoint), yet epsilon credited amplification. Replayed: predict each round's sample from the seed."""
    overrides = [*TINY, *SAMPLED, f"output_dir={tmp_path}", *([] if secret else ["dp.secret_sampling=false"])]
    cfg = compose_config("config", overrides)
    post, asked = inprocess_post(cfg), []

    def recording(contents, kind):
        asked.append(sorted(contents)) if kind == MessageType.TRAIN else None
        return post(contents, kind)

    results = run_rounds(recording, list(range(6)), cfg)
    rng = np.random.default_rng(cfg.seed)
    predicted = [sample_nodes(list(range(6)), 0.5, rng) for _ in asked]
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    epsilons = [r["epsilon"] for r in results["rounds"]]
    if secret:
        assert len(asked) == 6 and all(len(nodes) == 3 for nodes in asked)
        assert asked != predicted  # by chance with probability C(6, 3)^-6 = 1.6e-8
        assert results["dp"]["amplification"] == "secret sampling without replacement"
        assert epsilons == pytest.approx([amplified_epsilon(1.0, 3, 6, t, 1e-5) for t in range(1, 7)], rel=1e-9)
        assert results["dp"]["epsilon_without_amplification"] == pytest.approx(gaussian_epsilon(1.0, 6, 1e-5)[0], rel=1e-9)
        assert state["rng_state"] is None
        for record in [*results["rounds"], *state["rounds"]]:
            assert record["withheld_nodes"] == {"failed": 0, "capped": 0}
            assert not {"missing", "failures", "capped"} & record.keys()
    else:
        assert asked == predicted  # public, replayable
        assert results["dp"]["amplification"] == "none"
        assert epsilons == pytest.approx([gaussian_epsilon(1.0, t, 1e-5)[0] for t in range(1, 7)], rel=1e-9)
        assert state["rng_state"] == rng.bit_generator.state
        assert all(record["missing"] == [] for record in results["rounds"])


def test_a_round_with_a_secret_sample_records_how_many_nodes_failed_not_which():
    failed = RoundExchange([], 10, 20, [11, 12, 13], failed={12: "no reply before the round timeout"},
                           updates=[ClientUpdate(11, {}, 5, 0.7), ClientUpdate(13, {}, 5, 0.9)], capped={13: "cut"})
    hidden = round_record(0, 0, failed, None, 1.0, privacy(sampled=3, population=6))
    assert hidden["withheld_nodes"] == {"failed": 1, "capped": 1} and hidden["loss"] is None and hidden["clients"] == 2
    assert not any(str(node) in json.dumps(hidden) for node in (11, 12, 13))
    public = round_record(0, 0, failed, None, 1.0, privacy(sampled=3, population=6, secret=False))
    assert (public["missing"], public["capped"], public["loss"]) == ([12], {"13": "cut"}, None)
    assert round_record(0, 0, failed, None, 1.0)["loss"] == pytest.approx(0.8)  # without dp: recorded


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
    (["dp.secret_sampling=maybe"], r"unknown dp.secret_sampling 'maybe'; valid choices: false, true"),
])
def test_bad_dp_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_settings(compose_config("config", [*TINY, *overrides]))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["fedavg_lora", "ffa_lora", "head_only"])
def test_the_averaging_methods_take_dp(method):
    check_settings(compose_config("config", [*TINY, f"method={method}"]))
