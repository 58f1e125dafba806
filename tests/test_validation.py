"""Client replies are validated before any merge; adversarial clients are dropped, logged, survived."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_app.local_round import answer_request
from fedcil.checkpoint import load_checkpoint
from fedcil.config import compose_config, to_container
from fedcil.shapes import declared_shape
from fedcil.cli.run import FlowerSite, launch
from fedcil.model import model_for
from fedcil.protocol import encode_request
from fedcil.cli.inprocess import inprocess_post, run_inprocess
from server_app.loop import TooFewReplies, run_rounds
from fedcil.tasks import split_for
from server_app.validation import InvalidReply, ReplyLimits, checked_update, clipped
from strategies import build_strategy

ADVERSARIAL_APP = Path(__file__).resolve().parent / "adversarial_app"
sys.path.insert(0, str(ADVERSARIAL_APP))
from attacks import ATTACKS, attack_of, corrupt  # noqa: E402

TINY = ["num_clients=3", "num_tasks=2", "rounds_per_task=3", "local_epochs=1", "partition=iid"]
LIMITS = ReplyLimits(max_examples=10_000, max_norm=1e10)


def honest_exchange(method: str, *extra: str):
    """(cfg, plan, expected shapes, an honest client's reply) for the first round of ``method``."""
    cfg = compose_config("config", [*TINY, f"method={method}", *extra])
    shape = declared_shape(cfg.dataset)
    model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
    strategy = build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)
    strategy.start_task(0)
    plan = strategy.configure_round(0, 0)
    reply = answer_request(cfg, encode_request(plan, 0, 0), 1, cfg.num_clients)
    return cfg, plan, strategy.expected_reply(plan, 0), reply


@pytest.fixture(scope="module")
def fedavg():
    return honest_exchange("fedavg_lora")


def wire(content: RecordDict) -> RecordDict:
    """``content`` as the server receives it: through protobuf."""
    return recorddict_from_proto(recorddict_to_proto(content))


def parts(content: RecordDict) -> tuple[dict[str, np.ndarray], dict]:
    tensors = {k: v.numpy().copy() for k, v in content.array_records["update"].to_torch_state_dict().items()}
    return tensors, dict(content.metric_records["metrics"])


def assemble(tensors: dict[str, np.ndarray], metrics: dict) -> RecordDict:
    return RecordDict({"update": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}),
                       "metrics": MetricRecord(metrics)})


def test_an_honest_reply_passes_unchanged(fedavg):
    _, _, expected, reply = fedavg
    update = checked_update(5, wire(reply), expected, LIMITS)
    assert update.node_id == 5 and set(update.tensors) == set(expected) and update.num_examples > 0


# One defect at a time, drawn by hypothesis: the validator must refuse it with its own error.
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
bad_count = st.one_of(
    st.integers(max_value=-1, min_value=-(2**62)), st.integers(min_value=10_001, max_value=2**62),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer()), non_finite,
    st.floats(min_value=0, max_value=100).filter(float.is_integer),  # a whole float is not an integer count
)
defect = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100)),
    st.tuples(st.just("extra"), st.text(min_size=1, max_size=12)),
    st.tuples(st.just("shape"), st.integers(0, 100), st.lists(st.integers(0, 9), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(["int64", "int32", "uint8", "bool", "complex64"])),
    st.tuples(st.just("non_finite"), st.integers(0, 100), st.integers(0, 10**6), non_finite),
    st.tuples(st.just("norm"), st.integers(0, 100), st.floats(min_value=1e11, max_value=1e30)),
    st.tuples(st.just("count"), bad_count),
    st.tuples(st.just("loss"), non_finite),
    st.tuples(st.just("no_record"), st.sampled_from(["update", "metrics"])),
    st.tuples(st.just("metric_list"), st.sampled_from(["num-examples", "train-loss"])),
)


def apply_defect(reply: RecordDict, spec: tuple) -> RecordDict:
    tensors, metrics = parts(reply)
    keys = sorted(tensors)
    kind, *args = spec
    if kind == "drop":
        del tensors[keys[args[0] % len(keys)]]
    elif kind == "extra":
        tensors[args[0] if args[0] not in tensors else args[0] + "_"] = np.zeros(3, np.float32)
    elif kind == "shape":
        key = keys[args[0] % len(keys)]
        new = tuple(args[1]) if tuple(args[1]) != tensors[key].shape else (*args[1], 2)
        tensors[key] = np.zeros(new, np.float32)
    elif kind == "dtype":
        key = keys[args[0] % len(keys)]
        tensors[key] = tensors[key].astype(args[1])
    elif kind == "non_finite":
        key = keys[args[0] % len(keys)]
        tensors[key].reshape(-1)[args[1] % tensors[key].size] = args[2]
    elif kind == "norm":
        key = keys[args[0] % len(keys)]
        tensors[key] = np.full_like(tensors[key], args[1])
    elif kind == "count":
        metrics["num-examples"] = args[0]
    elif kind == "loss":
        metrics["train-loss"] = args[0]
    elif kind == "metric_list":
        metrics[args[0]] = [1, 2]
    content = assemble(tensors, metrics)
    if kind == "no_record":
        content = RecordDict({k: v for k, v in content.items() if k != args[0]})
    return content


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=defect)
def test_a_malformed_reply_never_passes_and_raises_only_the_validators_error(fedavg, spec):
    _, _, expected, reply = fedavg
    with pytest.raises(InvalidReply):
        checked_update(1, wire(apply_defect(reply, spec)), expected, LIMITS)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.dictionaries(st.text(max_size=8), st.lists(st.integers(0, 4), max_size=3), max_size=4),
       metrics=st.dictionaries(st.text(max_size=12), st.one_of(st.integers(-5, 5), st.floats()), max_size=3),
       records=st.sets(st.sampled_from(["update", "metrics", "config", "other"])))
def test_random_records_never_pass(fedavg, names, metrics, records):
    _, _, expected, _ = fedavg
    content = RecordDict()
    if "update" in records:
        content["update"] = ArrayRecord({k: torch.ones(shape) for k, shape in names.items()})
    if "metrics" in records:
        content["metrics"] = MetricRecord(metrics)
    if "config" in records:
        content["config"] = ConfigRecord({"num-examples": "12"})
    with pytest.raises(InvalidReply):
        checked_update(1, wire(content), expected, LIMITS)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), count=st.integers(0, 10_000), scale=st.floats(0, 100))
def test_any_well_formed_reply_within_the_bounds_passes(fedavg, seed, count, scale):
    _, _, expected, _ = fedavg
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: scale * torch.randn(shape, generator=generator) for k, shape in expected.items()}
    content = RecordDict({"update": ArrayRecord(tensors), "metrics": MetricRecord({"num-examples": count, "train-loss": 0.5})})
    assert checked_update(1, wire(content), expected, LIMITS).num_examples == count


@pytest.mark.parametrize("correct,count", [([3.0], [2.0]), ([-1.0], [4.0]), ([0.5], [4.0])])
def test_evaluation_counts_must_be_whole_and_ordered(correct, count):
    expected = {"eval.correct": (1,), "eval.count": (1,)}
    content = RecordDict({"update": ArrayRecord({"eval.correct": torch.tensor(correct, dtype=torch.float64),
                                                 "eval.count": torch.tensor(count, dtype=torch.float64)}),
                          "metrics": MetricRecord({"num-examples": 4, "train-loss": 0.0})})
    with pytest.raises(InvalidReply, match="correct <= count"):
        checked_update(1, content, expected, LIMITS)


@pytest.mark.parametrize("method,extra", [
    ("fedavg_lora", []), ("ffa_lora", []), ("fedex_lora", []), ("talora", []), ("talora", ["method.use_reswu=false"]),
    ("lorm", []), ("lorm", ["method.gram_alpha=0.5", "method.head_gram_alpha=0"]), ("head_only", []),
    ("analytic", ["method.blocks=null", "method.projection_dim=0"]), ("analytic", ["method.projection_dim=32"]),
])
def test_honest_clients_of_every_method_are_never_dropped(tmp_path, method, extra):
    """The expected names and shapes match what real clients send, for every kind of request."""
    cfg = compose_config("config", [*TINY, "rounds_per_task=2", f"method={method}", *extra, "evaluation=clients",
                                    f"output_dir={tmp_path}"])
    results = run_inprocess(cfg)
    assert all(r["clients"] == 3 and not r["failures"] for r in results["rounds"])


def test_clipping_scales_the_update_to_the_bound_and_leaves_small_ones(fedavg):
    _, plan, expected, reply = fedavg
    update = checked_update(1, reply, expected, LIMITS)
    norm = math.sqrt(sum(float((update.tensors[k].double() - plan.state[k].double()).square().sum()) for k in update.tensors))
    small = clipped(update, plan.state, 2 * norm)
    assert small is update
    half = clipped(update, plan.state, norm / 2)
    for key, value in half.tensors.items():
        want = plan.state[key].double() + 0.5 * (update.tensors[key].double() - plan.state[key].double())
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)


def position_of(contents) -> tuple[int, int]:
    """(task, round) of a round's requests."""
    config = next(iter(contents.values())).config_records["config"]
    return int(config["task"]), int(config["round"])


def adversarial_post(cfg, victim: int = 0, from_round: int = 0):
    """The in-process post, with ``victim``'s training replies corrupted (attacks in turn) from a round on."""
    honest = inprocess_post(cfg)

    def post(contents, kind):
        result = honest(contents, kind)
        task, round_in_task = position_of(contents)
        if kind == MessageType.TRAIN and task * cfg.rounds_per_task + round_in_task >= from_round:
            attack = attack_of(task, round_in_task, cfg.rounds_per_task)
            result.replies = [(n, corrupt(c, attack) if n == victim else c) for n, c in result.replies]
        return result

    return post


def without_node(cfg, victim: int = 0):
    """The in-process post whose node ``victim`` never answers: the reference for an excluded client."""
    honest = inprocess_post(cfg)

    def post(contents, kind):
        result = honest({n: c for n, c in contents.items() if n != victim}, kind)
        result.failed[victim] = "left out"
        return result

    return post


def test_too_few_valid_replies_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    cfg = compose_config("config", [*TINY, "min_replies=3", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(TooFewReplies, match="2 valid client replies, min_replies=3 needed"):
        run_rounds(adversarial_post(cfg, from_round=2), [0, 1, 2], cfg)
    checkpoint, _ = load_checkpoint(tmp_path / "run", to_container(cfg))
    assert (checkpoint.task, checkpoint.round_in_task) == (0, 1)
    resumed = compose_config("config", [*TINY, "min_replies=3", f"resume={tmp_path / 'run'}", f"output_dir={tmp_path / 'run'}"])
    whole = run_inprocess(compose_config("config", [*TINY, f"output_dir={tmp_path / 'whole'}"]))
    assert run_inprocess(resumed)["accuracy_matrix"] == whole["accuracy_matrix"]


@pytest.mark.e2e
def test_a_flower_simulation_with_an_adversarial_client_equals_the_run_without_it(tmp_path):
    """Partition 0 sends a different defect every round; the run equals one where it never answers."""
    rounds = math.ceil(len(ATTACKS) / 2)
    run = [*TINY, f"rounds_per_task={rounds}", "eval_every_round=false"]
    out = launch("config", [*run, f"output_dir={tmp_path / 'flower'}"], site=FlowerSite.isolated(tmp_path / "home"),
                 app_dir=ADVERSARIAL_APP)
    attacked = json.loads((out / "results.json").read_text())
    assert all(r["clients"] == 2 and len(r["failures"]) == 1 for r in attacked["rounds"])
    reasons = [next(iter(r["failures"].values())) for r in attacked["rounds"]]
    assert all(reason.startswith("invalid reply: ") for reason in reasons)
    cfg = compose_config("config", [*run, f"output_dir={tmp_path / 'reference'}"])
    reference = run_rounds(without_node(cfg), [0, 1, 2], cfg)
    # Tolerance: none. The same two clients' replies are merged in the same (canonical) order.
    assert attacked["accuracy_matrix"] == reference["accuracy_matrix"]
    assert [r["loss"] for r in attacked["rounds"]] == pytest.approx([r["loss"] for r in reference["rounds"]], rel=1e-12)


def boosting_post(cfg, factor: float, victim: int = 0):
    """The in-process post whose ``victim`` sends its update (trained minus sent) times ``factor``.

    A valid-looking reply (right names and shapes, finite, far under ``replies.max_norm``):
    only robust aggregation can limit it.
    """
    honest = inprocess_post(cfg)

    def post(contents, kind):
        result = honest(contents, kind)
        if kind == MessageType.TRAIN:
            boosted = []
            for node, content in result.replies:
                if node == victim:
                    sent = contents[node].array_records["state"].to_torch_state_dict()
                    tensors = {k: sent[k] + factor * (v - sent[k])
                               for k, v in content.array_records["update"].to_torch_state_dict().items()}
                    content = RecordDict({"update": ArrayRecord(tensors), "metrics": content.metric_records["metrics"]})
                boosted.append((node, content))
            result.replies = boosted
        return result

    return post


def test_norm_clipping_withstands_a_boosted_update(tmp_path):
    """One client's update x30 wrecks plain averaging; clipping every update to 1.5 restores it.

    (Honest updates here have L2 norms of about 1.9, at most 2.3.) Tolerance: 5 points of FAA.
    """
    run = [*TINY, "local_epochs=3", "replies.update_factor=null"]  # clip_norm alone (update bounds: test_update_bounds.py)
    honest = run_inprocess(compose_config("config", [*run, f"output_dir={tmp_path / 'honest'}"]))["faa"]
    plain = compose_config("config", [*run, f"output_dir={tmp_path / 'plain'}"])
    attacked = run_rounds(boosting_post(plain, 30), [0, 1, 2], plain)["faa"]
    clipped_cfg = compose_config("config", [*run, "replies.clip_norm=1.5", f"output_dir={tmp_path / 'clipped'}"])
    defended = run_rounds(boosting_post(clipped_cfg, 30), [0, 1, 2], clipped_cfg)["faa"]
    assert attacked < honest - 15
    assert abs(defended - honest) < 5
