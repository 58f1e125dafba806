"""Well-formed but dishonest clients: the influence bounds (server_app/influence.py), as maths and as real runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcil.cli.inprocess import inprocess_post
from fedcil.cli.run import FlowerSite, launch
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate, RoundPlan, WeightedSums
from fedcil.closed_form import merge_with_grams, regularise_gram
from fedcil.tasks import make_task_split
from server_app.influence import (DIRECTION_RIDGE, InfluenceBounds, bound_influence, direction_ratios, gram_problem,
                                  sanity_problem, summed_tensors, trace_of)
from strategies.analytic import Analytic, feature_sums
from strategies.lorm import LoRM, LoRMSettings, client_summaries
from server_app.loop import run_rounds

ADVERSARIAL_APP = Path(__file__).resolve().parent / "adversarial_app"
sys.path.insert(0, str(ADVERSARIAL_APP))
from dishonest import lie  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "simclr-13e261fc37a457be" / "backbone.safetensors"
SKEWED = ["experiment=digits_ssl", f"model.pretrained_path={PRETRAINED}", "num_clients=5", "num_tasks=2",
          "rounds_per_task=2", "local_epochs=2", "partition.beta=0.1"]
BOUNDS_OFF = ["replies.weighting=claimed", "replies.energy_factor=null", "replies.psd_tolerance=null"]
GRAMS = WeightedSums({"G": ("N",)}, per_example=("nb",))


def reply(node: int, n: int, gram: torch.Tensor, factor: torch.Tensor) -> ClientUpdate:
    """A Gram method's reply: Gram ``gram``, numerator ``factor @ gram``, ``nb = n * 1``."""
    return ClientUpdate(node, {"G": gram, "N": factor @ gram, "nb": torch.full((2,), float(n))}, n, 0.0)


def random_gram(seed: int, rows: int, dim: int = 6) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.T @ x).float()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), shift=st.floats(-2.0, 2.0))
def test_a_gram_passes_exactly_when_its_smallest_eigenvalue_is_within_the_tolerance(seed, rows, shift):
    """Against the eigenvalues: ``G - c I`` passes iff ``lambda_min >= -tol * trace`` (away from the boundary)."""
    gram = random_gram(seed, rows).double()
    tolerance = 1e-6
    shifted = gram - shift * float(torch.linalg.eigvalsh(gram)[-1]) * torch.eye(6, dtype=torch.float64) / 10
    smallest, trace = float(torch.linalg.eigvalsh(shifted)[0]), float(torch.trace(shifted))
    margin = 1e-3 * abs(trace) + 1e-9
    if trace > 0 and smallest >= -tolerance * trace + margin:
        assert gram_problem(shifted, tolerance) is None
    elif smallest < -tolerance * max(trace, 0.0) - margin:
        assert gram_problem(shifted, tolerance) is not None


def test_diagonal_grams_must_be_non_negative_and_dense_ones_symmetric():
    assert gram_problem(torch.tensor([1.0, 0.0, 2.0]), 1e-6) is None
    assert "1 negative" in gram_problem(torch.tensor([1.0, -1e-9, 2.0]), 1e-6)
    gram = random_gram(0, 10)
    gram[0, 1] += 1.0
    assert "not symmetric" in gram_problem(gram, 1e-6)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 10_000), min_size=3, max_size=9), cap=st.floats(1.0, 5.0))
def test_capping_bounds_every_weight_and_keeps_each_clients_own_solution(counts, cap):
    """No weight above ``cap`` x the median (count and Gram trace); the implied solution ``N G^-1`` is unchanged."""
    updates = [reply(node, n, random_gram(node, 20) * n, torch.randn(2, 6, generator=torch.Generator().manual_seed(node)))
               for node, n in enumerate(counts)]
    bounded = bound_influence(updates, GRAMS, InfluenceBounds("capped", cap, energy_factor=None))
    median_count = sorted(counts)[(len(counts) - 1) // 2: len(counts) // 2 + 1]
    median_trace = sorted(trace_of(u.tensors["G"]) for u in updates)[(len(counts) - 1) // 2: len(counts) // 2 + 1]
    assert not bounded.dropped
    for before, after in zip(updates, bounded.updates, strict=True):
        assert after.num_examples <= max(before.num_examples, 1) and after.num_examples <= cap * sum(median_count) / len(median_count)
        assert trace_of(after.tensors["G"]) <= cap * sum(median_trace) / len(median_trace) * (1 + 1e-6)
        own = torch.linalg.solve(before.tensors["G"].double(), before.tensors["N"].double().T)
        solution = torch.linalg.solve(after.tensors["G"].double(), after.tensors["N"].double().T)
        torch.testing.assert_close(solution, own, rtol=1e-5, atol=1e-6)  # float32 replies, rescaled
        torch.testing.assert_close(after.tensors["nb"], torch.full((2,), float(after.num_examples)), rtol=1e-6, atol=0.0)
        assert (after is before) == (before.node_id not in bounded.capped)


def test_uniform_weighting_gives_every_reply_with_data_the_median_weight():
    updates = [reply(node, n, random_gram(node, 20) * n, torch.eye(2, 6)) for node, n in enumerate([10, 30, 1000])]
    updates.append(ClientUpdate(3, {"G": torch.zeros(6, 6), "N": torch.zeros(2, 6), "nb": torch.zeros(2)}, 0, 0.0))
    bounded = bound_influence(updates, GRAMS, InfluenceBounds("uniform", energy_factor=None))
    assert [u.num_examples for u in bounded.updates] == [30, 30, 30, 0]
    traces = [trace_of(u.tensors["G"]) for u in bounded.updates[:3]]
    assert traces == pytest.approx([traces[1]] * 3)


def test_energy_per_example_off_the_median_and_grams_without_examples_are_dropped():
    updates = [reply(node, 50, random_gram(node, 50), torch.eye(2, 6)) for node in range(4)]
    updates.append(reply(4, 50, 1000 * random_gram(4, 50), torch.eye(2, 6)))
    updates.append(reply(5, 0, random_gram(5, 50), torch.eye(2, 6)))
    bounded = bound_influence(updates, GRAMS, InfluenceBounds())
    assert sorted(bounded.dropped) == [4, 5]
    assert "energy per example" in bounded.dropped[4] and "num-examples=0" in bounded.dropped[5]
    assert [u.node_id for u in bounded.updates] == [0, 1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), classes=st.integers(1, 5))
def test_honest_analytic_sums_pass_the_cauchy_schwarz_bound_and_a_boosted_one_fails(seed, n, classes):
    generator = torch.Generator().manual_seed(seed)
    sums = feature_sums(torch.randn(n, 6, generator=generator), torch.randint(0, classes, (n,), generator=generator), classes)
    declared = Analytic({"head.weight": torch.zeros(classes, 6), "head.bias": torch.zeros(classes)}).weighted_sums(
        RoundPlan({}, (), extra={"statistics": "analytic"}))
    honest = ClientUpdate(1, {k: v.float() for k, v in sums.items()}, n, 0.0)
    assert sanity_problem(honest, declared, 1e-6) is None
    bound = n * float(torch.trace(sums["G"]))
    just_over = (1.001 * bound / float(sums["C"].square().sum())) ** 0.5  # C scaled to 1.001 x the bound
    boosted = ClientUpdate(1, {"G": honest.tensors["G"], "C": (sums["C"] * just_over).float()}, n, 0.0)
    assert "squared norm" in sanity_problem(boosted, declared, 1e-6)


@pytest.mark.parametrize("sums", [WeightedSums(), GRAMS], ids=["averaging", "grams"])
def test_a_round_in_which_no_reply_claims_an_example_is_dropped_whole(sums):
    """Every merge divides by the round's examples or Grams: all-zero claims would crash it; they are dropped
    (the loop then stops the run with min_replies' one line, checkpoint kept)."""
    zero = {"G": torch.zeros(6, 6), "N": torch.zeros(2, 6), "nb": torch.zeros(2)}
    bounded = bound_influence([ClientUpdate(node, dict(zero), 0, 0.0) for node in range(3)], sums, InfluenceBounds())
    assert bounded.updates == [] and sorted(bounded.dropped) == [0, 1, 2]
    assert all("claims an example" in reason for reason in bounded.dropped.values())


LAYERS = ("blocks.0.attn.qkv", "blocks.0.mlp.fc1")


def tiny_lorm(gram_alpha: float) -> LoRM:
    """LoRM with two adapted layers (8 inputs, rank 2) and a 6-wide head of 2 tasks x 2 classes."""
    g = torch.Generator().manual_seed(0)
    state = {f"{layer}.lora_{f}": torch.randn(*shape, generator=g) for layer in LAYERS for f, shape in (("A", (2, 8)), ("B", (5, 2)))}
    state |= {"head.weight": torch.randn(4, 6, generator=g), "head.bias": torch.zeros(4)}
    split = make_task_split(4, 2, None, "natural", seed=0)
    return LoRM(state, split, 1.0, seed=0, settings=LoRMSettings(gram_alpha=gram_alpha, head_gram_alpha=0.5))


def honest_lorm_reply(strategy: LoRM, node: int, factor: str) -> ClientUpdate:
    """A LoRM A- or B-round reply of 40 examples: the client's factor and head rows trained, its Grams from random inputs."""
    rng = np.random.default_rng(node)
    trained = {k: v.clone() for k, v in strategy.state.items()}
    trained.update({k: v + torch.as_tensor(rng.normal(size=tuple(v.shape)), dtype=v.dtype) for k, v in trained.items()
                    if k.endswith(factor) or k.startswith("head.")})
    grams = {layer: regularise_gram(torch.as_tensor(x.T @ x), strategy.settings.gram_alpha)
             for layer, x in ((layer, rng.normal(size=(400, 8))) for layer in LAYERS)}
    x = rng.normal(size=(40, 6))
    grams["head"] = regularise_gram(torch.as_tensor(x.T @ x), 0.5)
    summary = client_summaries(trained, grams, factor, range(0, 2), 40)
    return ClientUpdate(node, {k: v.float() for k, v in summary.items()}, 40, 0.0)


@pytest.mark.parametrize("gram_alpha", [0.0, 1.0], ids=["diagonal", "dense"])
def test_a_reply_claiming_no_examples_with_non_zero_numerators_is_dropped(gram_alpha):
    """Nine honest LoRM A-round replies and one that claims 0 examples, sends zero Grams and
    numerators (AG, head.WG, head.nb) of 10^4 (measured before: A moved by 4.5e4, a head bias
    from 0.37 to 463). Dropped; the merge equals the nine honest replies' (tolerance: none)."""
    strategy = tiny_lorm(gram_alpha)
    plan = strategy.configure_round(0, 1)  # an A-round
    sums = strategy.weighted_sums(plan)
    honest = [honest_lorm_reply(strategy, node, "lora_A") for node in range(9)]
    liar = {key: torch.zeros_like(value) if key in sums.grams else torch.full_like(value, 1e4) for key, value in honest[0].tensors.items()}
    bounded = bound_influence([*honest, ClientUpdate(9, liar, 0, 0.0)], sums, InfluenceBounds())
    assert list(bounded.dropped) == [9] and "num-examples=0" in bounded.dropped[9]
    attacked, reference = tiny_lorm(gram_alpha), tiny_lorm(gram_alpha)
    attacked.aggregate_round(0, 1, bounded.updates)
    reference.aggregate_round(0, 1, honest)
    for key, value in reference.state.items():
        assert torch.equal(attacked.state[key], value), key


def lorm_plans(strategy: LoRM) -> list[RoundPlan]:
    return [strategy.configure_round(0, 0), strategy.configure_round(0, 1), strategy.task_end_plan(0)]


@pytest.mark.parametrize("gram_alpha", [0.0, 1.0], ids=["diagonal", "dense"])
def test_gram_methods_declare_every_tensor_they_sum(gram_alpha):
    """Every tensor of a LoRM or analytic statistics reply is summed by the merge, so each must be declared
    (an undeclared one would escape the zero-claim check and the scaling)."""
    strategy = tiny_lorm(gram_alpha)
    for plan in lorm_plans(strategy):
        assert summed_tensors(strategy.weighted_sums(plan)) == sorted(strategy.expected_reply(plan, 0))
    analytic = Analytic({"head.weight": torch.zeros(3, 6), "head.bias": torch.zeros(3)})
    plan = analytic.configure_round(0, 0)
    assert summed_tensors(analytic.weighted_sums(plan)) == sorted(analytic.expected_reply(plan, 0))


def brute_force_ratio(grams: list[np.ndarray], k: int, ridge: float) -> float:
    """``max eig((M_k + rho I)^-1 P_k)`` by numpy's general eigensolver, ``M_k`` the others' mean (diagonal: per entry)."""
    dense = [np.diag(g) if g.ndim == 1 else g for g in grams]
    d = dense[0].shape[0]
    rho = ridge * np.trace(sum(dense)) / (len(dense) * d)
    others = sum(g for j, g in enumerate(dense) if j != k) / (len(dense) - 1)
    return float(np.linalg.eigvals(np.linalg.solve(others + rho * np.eye(d), dense[k])).real.max())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), clients=st.integers(2, 6), dim=st.integers(1, 7), rows=st.integers(1, 10),
       diagonal=st.booleans(), ridge=st.sampled_from([1e-6, 1e-2, 1.0]))
def test_direction_ratios_match_the_generalised_eigenvalues_against_the_others_mean(seed, clients, dim, rows, diagonal, ridge):
    """One Cholesky factor of the sum for every reply, against numpy's eigenvalues of ``(M_k + rho I)^-1 P_k``
    (rank-deficient Grams included: fewer rows than dimensions)."""
    rng = np.random.default_rng(seed)
    grams = []
    for _ in range(clients):
        x = rng.normal(size=(rows, dim)) * rng.uniform(0.1, 3, dim)
        grams.append(np.diag(x.T @ x).copy() if diagonal else x.T @ x)
    ratios = direction_ratios([torch.as_tensor(g) for g in grams], ridge)
    expected = [brute_force_ratio(grams, k, ridge) for k in range(clients)]
    np.testing.assert_allclose(ratios, expected, rtol=1e-6, atol=1e-9)


ROWS = 400


def one_direction_updates(seed: int = 0, dim: int = 60, honest: int = 9) -> tuple[list[ClientUpdate], np.ndarray, np.ndarray]:
    """Nine honest replies of 400 examples of 60 inputs (numerators toward one factor ``W``), input 0 rarely used;
    a tenth with the median count and median trace, all of it on coordinate 0, numerator toward ``F``.
    Returns the replies, ``W`` and ``F``."""
    rng = np.random.default_rng(seed)
    truth, foreign = rng.normal(size=(2, dim)), rng.normal(size=(2, dim)) + 5
    updates = []
    for node in range(honest):
        x = rng.normal(size=(ROWS, dim))
        x[:, 0] *= 0.5
        gram = torch.as_tensor(x.T @ x)
        updates.append(ClientUpdate(node, {"G": gram, "N": torch.as_tensor(truth) @ gram, "nb": torch.full((2,), float(ROWS))}, ROWS, 0.0))
    trace = float(np.median([trace_of(u.tensors["G"]) for u in updates]))
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    gram[0, 0] = trace
    updates.append(ClientUpdate(honest, {"G": gram, "N": torch.as_tensor(foreign) @ gram, "nb": torch.full((2,), float(ROWS))}, ROWS, 0.0))
    return updates, truth, foreign


def one_direction_round(cap: float | None, seed: int = 0, dim: int = 60, honest: int = 9):
    """The replies of :func:`one_direction_updates` under ``direction_factor=cap``. Returns the share of the merged
    solution on coordinate 0 that follows ``F``, the bounds' record, and ``q`` (what the ridge adds to the honest
    mean there, see below)."""
    updates, truth, foreign = one_direction_updates(seed, dim, honest)
    trace = trace_of(updates[honest].tensors["G"])
    bounds = InfluenceBounds("claimed", direction_factor=cap)
    bounded = bound_influence(updates, GRAMS, bounds)
    numerator = sum(u.tensors["N"] for u in bounded.updates)
    merged = merge_with_grams(numerator, sum(u.tensors["G"] for u in bounded.updates), 1e-9).numpy()
    share = (merged[:, 0] - truth[:, 0]) / (foreign[:, 0] - truth[:, 0])
    mean = (sum(u.tensors["G"] for u in updates[:honest]) / (honest * ROWS)).numpy()
    rho = DIRECTION_RIDGE * (np.trace(mean) * honest + trace / ROWS) / (len(updates) * dim)
    inflation = np.linalg.inv(mean)[0, 0] / np.linalg.inv(mean + rho * np.eye(dim))[0, 0]
    return share, bounded.capped, inflation


@pytest.mark.parametrize("cap", [3.0, 10.0])
def test_one_rarely_used_direction_gets_at_most_the_documented_share(cap):
    """The one-direction attack: without the bound the liar owns coordinate 0 (share > 0.95);
    with ``direction_factor=cap`` its share there is at most ``cap q / (cap q + K - 1)``, where
    ``q = v^T M^-1 v / v^T (M + rho I)^-1 v >= 1`` is what the ridge adds to the others' mean
    ``M`` in that direction: here ``q < 1.05``, so about ``cap / (cap + K - 1)``."""
    unbounded, record, _ = one_direction_round(None)
    assert not record and unbounded.min() > 0.95
    share, record, inflation = one_direction_round(cap)
    assert list(record) == [9] and "strongest direction" in record[9]
    assert 1 <= inflation < 1.05
    assert share.max() <= cap * inflation / (cap * inflation + 9) * (1 + 1e-6)


@pytest.mark.parametrize("cap", [None, 3.0, 1e12])
def test_the_round_records_its_largest_direction_ratio_before_any_cut(cap):
    """With ``direction_factor`` set, cutting or not, the bounds report the largest ratio of any reply's Gram:
    the liar's, as numpy's general eigensolver computes it; without it, nothing is computed."""
    updates, _, _ = one_direction_updates()
    bounded = bound_influence(updates, GRAMS, InfluenceBounds("claimed", direction_factor=cap))
    if cap is None:
        assert bounded.direction_ratio is None
        return
    per_example = [(u.tensors["G"] / u.num_examples).numpy() for u in updates]
    expected = [brute_force_ratio(per_example, k, DIRECTION_RIDGE) for k in range(len(updates))]
    assert int(np.argmax(expected)) == 9 and max(expected) > 100
    assert (bounded.direction_ratio.gram, bounded.direction_ratio.node) == ("G", 9)
    assert bounded.direction_ratio.ratio == pytest.approx(max(expected), rel=1e-6)
    assert bool(bounded.capped) == (cap < max(expected))


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 10_000), min_size=2, max_size=9), share=st.floats(0.05, 0.95))
def test_bounded_weighting_cuts_a_claim_to_its_share_of_the_round_with_its_grams(counts, share):
    """A claim above ``max_share`` of the round's claims is cut to that share of itself and the others'
    (unchanged) claims: ``n <= share / (1 - share) x others``, so one liar's weight is at most ``max_share``.
    A cut reply's Grams and numerators are scaled with its count: its statistics per example and its own
    solution stay."""
    updates = [reply(node, n, random_gram(node, 20) * n, torch.randn(2, 6, generator=torch.Generator().manual_seed(node)))
               for node, n in enumerate(counts)]
    bounded = bound_influence(updates, GRAMS, InfluenceBounds("bounded", max_share=share, energy_factor=None))
    assert not bounded.dropped
    for node, (before, after) in enumerate(zip(updates, bounded.updates, strict=True)):
        others = sum(n for j, n in enumerate(counts) if j != node)
        assert after.num_examples <= max(1.0, share * (after.num_examples + others) * (1 + 1e-12))
        assert after.num_examples == before.num_examples or after.num_examples + 1 > share / (1 - share) * others
        torch.testing.assert_close(after.tensors["G"].double() / after.num_examples,
                                   before.tensors["G"].double() / before.num_examples, rtol=1e-5, atol=0.0)
        own = torch.linalg.solve(before.tensors["G"].double(), before.tensors["N"].double().T)
        solution = torch.linalg.solve(after.tensors["G"].double(), after.tensors["N"].double().T)
        torch.testing.assert_close(solution, own, rtol=1e-5, atol=1e-6)
        assert (after is before) == (node not in bounded.capped)


def test_secure_aggregation_needs_claimed_weighting():
    cfg = compose_config("config", ["method=lorm", "secagg.enabled=true"])
    from fedcil.settings import check_settings
    with pytest.raises(ConfigError, match="replies.weighting=bounded .* set replies.weighting=claimed"):
        check_settings(cfg)


def lying_post(cfg, attack: str, victim: int = 0):
    """The in-process post whose ``victim`` sends every training and statistics reply as ``attack`` lies."""
    honest = inprocess_post(cfg)

    def post(contents, kind):
        result = honest(contents, kind)
        if kind == MessageType.TRAIN:
            result.replies = [(n, lie(c, attack, cfg.replies.max_examples) if n == victim else c) for n, c in result.replies]
        return result

    return post


def run(tmp_path: Path, method: str, attack: str | None, *extra: str) -> dict:
    cfg = compose_config("config", [*SKEWED, f"method={method}", *extra, f"output_dir={tmp_path / f'{attack}{len(extra)}'}"])
    post = inprocess_post(cfg) if attack is None else lying_post(cfg, attack)
    return run_rounds(post, list(range(cfg.num_clients)), cfg)


@pytest.fixture(scope="module")
def honest_faa(tmp_path_factory) -> dict[str, float]:
    """Per method, the FAA of the run without an attacker (the defaults)."""
    return {method: run(tmp_path_factory.mktemp(method), method, None)["faa"] for method in ("fedavg_lora", "lorm")}


@pytest.mark.parametrize("method,attack", [("fedavg_lora", "inflate_count"), ("lorm", "scale_grams"), ("lorm", "negative_gram")])
def test_the_defaults_withstand_a_well_formed_attacker_that_wins_without_them(tmp_path, honest_faa, method, attack):
    """5 clients on a strongly skewed partition, client 0 lying in every reply (tests/adversarial_app/dishonest.py).

    Measured: FedAvg-LoRA 50.4 honest, 19.6 with a claimed count of 10^7 unbounded, 46.0
    with the count cut to half the round's claims (``max_share``); LoRM 67.3 honest,
    9.8 / 20.2 unbounded (Grams x1000 toward a foreign factor / Grams x-3), 67.1 with the
    liar dropped. Tolerance: 6 points of FAA; the unbounded attack must cost at least 20.
    """
    defended = run(tmp_path, method, attack)
    unbounded = run(tmp_path, method, attack, *BOUNDS_OFF)
    assert unbounded["faa"] < honest_faa[method] - 20
    assert abs(defended["faa"] - honest_faa[method]) < 6
    if method == "lorm":  # dropped from every exchange, and said why
        assert all(r["clients"] == 4 and r["failures"]["0"].startswith("out of bounds: ") for r in defended["rounds"])
    else:  # kept, its weight cut
        assert all(r["capped"]["0"].startswith("num-examples 10000000 -> ") for r in defended["rounds"])


def test_an_honest_run_records_each_rounds_largest_direction_ratio_and_a_bound_above_it_changes_nothing(tmp_path, honest_faa):
    """LoRM with ``replies.direction_factor=1e12``: every round records its largest ratio (over the training
    and the end-of-task exchanges), no reply is cut, and the run equals the one without the bound."""
    measured = run(tmp_path, "lorm", None, "replies.direction_factor=1e12")
    largest = [r["largest_direction_ratio"] for r in measured["rounds"]]
    assert all(0 < x["ratio"] < 1e12 and x["node"] in range(5) and x["gram"] for x in largest)
    assert not any(r["capped"] for r in measured["rounds"])
    assert measured["faa"] == honest_faa["lorm"]


@pytest.mark.e2e
def test_a_flower_simulation_drops_a_client_scaling_its_grams(tmp_path):
    """LoRM in a Flower simulation, partition 0 scaling its Grams and numerators: dropped from every
    exchange, the run equals the in-process run without that client (tolerance: none)."""
    tiny = ["num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=1", "partition=iid", "method=lorm",
            "eval_every_round=false"]
    out = launch("config", [*tiny, "+attack=scale_grams", f"output_dir={tmp_path / 'flower'}"],
                 site=FlowerSite.isolated(tmp_path / "home"), app_dir=ADVERSARIAL_APP)
    attacked = json.loads((out / "results.json").read_text())
    reasons = [list(r["failures"].values()) for r in attacked["rounds"]]  # keyed by Flower's node ids
    assert all(r["clients"] == 2 for r in attacked["rounds"])
    assert all(len(reason) == 1 and "energy per example" in reason[0] for reason in reasons)
    cfg = compose_config("config", [*tiny, f"output_dir={tmp_path / 'reference'}"])
    honest = inprocess_post(cfg)

    def without_node_0(contents, kind):
        result = honest({n: c for n, c in contents.items() if n != 0}, kind)
        result.failed[0] = "left out"
        return result

    reference = run_rounds(without_node_0, [0, 1, 2], cfg)
    assert attacked["accuracy_matrix"] == reference["accuracy_matrix"]
