"""Dense Grams travel as packed upper triangles (float32 by default): the server merges what it would have
merged from square replies, drops malformed triangles, and secure aggregation sums them packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.model import model_for
from fedcil.protocol import (
    ClientUpdate, Packing, RoundPlan, canonical_order, decode_request, encode_reply, pack_upper, unpack_upper,
)
from fedcil.secagg.client import respond
from fedcil.settings import check_settings
from fedcil.shapes import declared_shape
from fedcil.tasks import split_for
from server_app.federation import RoundExchange
from server_app.loop import checked_sender
from server_app.validation import InvalidReply, ReplyLimits, checked_update
from strategies import build_strategy
from strategies.analytic import ridge_head

MICRO = ["num_clients=4", "num_tasks=2", "partition=iid"]
LIMITS = ReplyLimits(max_examples=10_000, max_norm=1e13)
U32 = 2.0**-24  # float32's unit roundoff


def wire(content: RecordDict) -> RecordDict:
    """``content`` as the other side receives it: through protobuf."""
    return recorddict_from_proto(recorddict_to_proto(content))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24).flatmap(lambda d: arrays(np.float64, (d, d), elements=st.floats(allow_nan=False, allow_infinity=False))))
def test_packing_round_trips_any_symmetric_matrix_exactly(square):
    symmetric = torch.from_numpy(np.triu(square) + np.triu(square, 1).T)  # any symmetric matrix, extreme values too
    packed = pack_upper(symmetric)
    assert packed.shape == (len(square) * (len(square) + 1) // 2,)
    assert torch.equal(unpack_upper(packed), symmetric)
    # what travels: the same bits after protobuf
    received = wire(encode_reply({"G": symmetric}, 1, 0.0, Packing(("G",)))).array_records["update"].to_torch_state_dict()
    assert torch.equal(unpack_upper(received["G"]), symmetric)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31))
def test_the_sum_of_packed_triangles_is_the_packed_sum(size, clients, seed):
    rng = np.random.default_rng(seed)
    grams = [torch.from_numpy(x.T @ x) for x in (rng.standard_normal((size + 2, size)) for _ in range(clients))]
    grams = [(g + g.T) / 2 for g in grams]
    total = torch.zeros(size, size, dtype=torch.float64)
    packed_total = torch.zeros(size * (size + 1) // 2, dtype=torch.float64)
    for g in grams:  # the same additions in the same order, entry by entry
        total += g
        packed_total += pack_upper(g)
    assert torch.equal(unpack_upper(packed_total), total)


def micro_strategy(method: str, *extra: str):
    narrow = ["method.projection_dim=0"] if method == "analytic" else []  # Grams of the backbone's width
    cfg = compose_config("config", [*MICRO, f"method={method}", *narrow, *extra])
    shape = declared_shape(cfg.dataset)
    model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
    strategy = build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)
    strategy.start_task(0)
    return cfg, strategy


def gram_plan(strategy) -> RoundPlan:
    """The first plan of task 0 whose reply carries a dense Gram: its first round's, or its end-of-task one."""
    plans = [strategy.configure_round(0, 0), strategy.task_end_plan(0)]
    return next(p for p in plans if p and Packing.of(strategy.weighted_sums(p), strategy.expected_reply(p, 0), "float64").grams)


def merge(strategy, plan: RoundPlan, updates: list[ClientUpdate]) -> None:
    """``strategy`` merges the replies to ``plan`` (a round's, or the end of task 0's)."""
    if plan.extra == strategy.configure_round(0, 0).extra:
        strategy.aggregate_round(0, 0, updates)
    else:
        strategy.end_task(0, updates)


def honest_replies(strategy, plan: RoundPlan, nodes: range, seed: int, dtype: torch.dtype) -> dict[int, tuple[dict, int, float]]:
    """Per node, replies made from random data: each Gram ``X^T X`` (exactly symmetric) or its diagonal, a
    numerator with one-hot targets ``X^T Y`` with its Gram's ``X``, anything else random."""
    rng = np.random.default_rng(seed)
    sums, shapes = strategy.weighted_sums(plan), strategy.expected_reply(plan, 0)
    targets = {gram: numerator for numerator, gram in sums.unit_targets.items()}
    replies = {}
    for node in nodes:
        count, tensors = int(rng.integers(20, 30)), {}
        for name, shape in shapes.items():
            if name in sums.grams:
                x = rng.standard_normal((count, shape[0]))
                tensors[name] = (x.T @ x + (x.T @ x).T) / 2 if len(shape) == 2 else (x * x).sum(0)
                if name in targets:
                    labels = np.eye(shapes[targets[name]][1])[rng.integers(0, shapes[targets[name]][1], count)]
                    tensors[targets[name]] = x.T @ labels
            elif name not in tensors:
                tensors[name] = rng.standard_normal(shape)
        replies[node] = ({k: torch.tensor(v, dtype=dtype) for k, v in tensors.items()}, count, float(rng.uniform(0, 2)))
    return replies


def answering(replies: dict[int, tuple[dict, int, float]], secure: bool, sent: list[RecordDict] | None = None):
    """A :data:`~server_app.federation.Post` whose clients answer each request with their reply, packed
    as the request asks (through protobuf both ways, and through the client's secagg stages when ``secure``)."""
    states = {node: RecordDict() for node in replies}

    def answer(node: int, content: RecordDict) -> RecordDict:
        if sent is not None:
            sent.append(content)
        return encode_reply(*replies[node], decode_request(content).packing)

    def post(contents, kind) -> RoundExchange:
        result = RoundExchange(replies=[], bytes_up=0, bytes_down=0, sampled=list(contents))
        for node, content in contents.items():
            content = wire(content)
            reply = respond(content, states[node], node, lambda c, n=node: answer(n, c)) if secure else answer(node, content)
            result.replies.append((node, wire(reply)))
        return result

    return post


@pytest.mark.parametrize("method", ["analytic", "lorm"])
@pytest.mark.parametrize("secure", [False, True])
def test_a_packed_round_merges_as_the_square_replies_do(method, secure):
    """float64 triangles (and LoRM's float32 ones, computed in float32): the merged state is bit for bit the
    merge of the square replies, plainly and through secure aggregation (up to its fixed-point bound)."""
    cfg, strategy = micro_strategy(method, "replies.gram_dtype=float64", f"secagg.enabled={str(secure).lower()}")
    _, reference = micro_strategy(method)
    plan = gram_plan(strategy)
    dtype = torch.float32 if method == "lorm" else torch.float64
    replies = honest_replies(strategy, plan, range(10, 14), seed=3, dtype=dtype)
    sent: list[RecordDict] = []
    result = checked_sender(answering(replies, secure, sent), cfg, strategy)(plan, 0, 0, sorted(replies))
    assert not result.failed and not result.capped
    asked = decode_request(sent[0]).packing
    assert asked.grams and set(asked.grams) <= set(strategy.weighted_sums(plan).grams)
    squares = [ClientUpdate(node, tensors, n, loss) for node, (tensors, n, loss) in replies.items()]
    if secure:
        [total] = result.updates
        for name, value in total.tensors.items():
            exact = sum(u.tensors[name].double() for u in squares)
            torch.testing.assert_close(value, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
            assert value.dtype == torch.float64 and (name not in asked.grams or torch.equal(value, value.T))
        return
    assert [tuple(u.tensors[g].shape) for u in result.updates for g in asked.grams] == \
           [tuple(u.tensors[g].shape) for u in squares for g in asked.grams]
    merge(strategy, plan, result.updates)
    merge(reference, plan, canonical_order(squares))
    for name, value in reference.state.items():
        assert torch.equal(strategy.state[name], value), name


def test_packed_float32_grams_halve_and_halve_again_what_a_client_uploads():
    _, strategy = micro_strategy("analytic")
    plan = gram_plan(strategy)
    [(tensors, count, loss)] = honest_replies(strategy, plan, range(1), seed=0, dtype=torch.float64).values()
    size = {dtype: recorddict_to_proto(encode_reply(tensors, count, loss, Packing(("G",), dtype))).ByteSize()
            for dtype in ("float64", "float32")}
    square = recorddict_to_proto(encode_reply(tensors, count, loss)).ByteSize()
    width = tensors["G"].shape[0]
    for dtype, entry in (("float64", 8), ("float32", 4)):  # d x d entries of 8 bytes become d (d + 1) / 2 of `entry`
        assert abs(size[dtype] - (square - 8 * width**2 + entry * width * (width + 1) // 2)) <= 16


@pytest.fixture(scope="module")
def analytic_reply():
    _, strategy = micro_strategy("analytic")
    plan = gram_plan(strategy)
    [(tensors, count, loss)] = honest_replies(strategy, plan, range(1), seed=1, dtype=torch.float64).values()
    return strategy.expected_reply(plan, 0), tensors, count, loss


def malformed(kind: str, tensors: dict) -> dict:
    """``tensors`` with ``G`` packed wrongly (what a packing client puts in its reply)."""
    packed = pack_upper(tensors["G"]).float()
    defects = {
        "square": tensors["G"],  # sent unpacked
        "short": packed[:-1],  # one entry missing: no triangle
        "other size": pack_upper(tensors["G"][:-1, :-1]).float(),  # a triangle of another Gram's size
        "2-D": packed[None, :],
        "integer": packed.to(torch.int32),
        "nan": torch.cat([packed[:-1], torch.tensor([float("nan")])]),
        "inf": torch.cat([torch.tensor([float("inf")]), packed[1:]]),
    }
    return {**tensors, "G": defects[kind]}


@pytest.mark.parametrize("kind", ["square", "short", "other size", "2-D", "integer", "nan", "inf"])
def test_a_malformed_packed_gram_is_an_invalid_reply(analytic_reply, kind):
    expected, tensors, count, loss = analytic_reply
    packing = Packing(("G",), "float32")
    assert checked_update(1, wire(encode_reply(tensors, count, loss, packing)), expected, LIMITS, packing).tensors["G"].shape == expected["G"]
    content = wire(encode_reply(malformed(kind, tensors), count, loss))
    with pytest.raises(InvalidReply):
        checked_update(1, content, expected, LIMITS, packing)


def test_a_client_sending_a_malformed_packed_gram_is_dropped_and_the_round_goes_on():
    cfg, strategy = micro_strategy("analytic")
    plan = gram_plan(strategy)
    replies = honest_replies(strategy, plan, range(10, 13), seed=2, dtype=torch.float64)
    post = answering(replies, secure=False)

    def lying(contents, kind) -> RoundExchange:
        result = post(contents, kind)
        node, content = result.replies[0]
        bad = content.array_records["update"].to_torch_state_dict()
        result.replies[0] = (node, encode_reply({**bad, "G": bad["G"][:-1]}, 25, 0.0))
        return result

    result = checked_sender(lying, cfg, strategy)(plan, 0, 0, sorted(replies))
    assert list(result.failed) == [10] and "no floating upper triangle" in result.failed[10]
    assert sorted(u.node_id for u in result.updates) == [11, 12]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 6), st.sampled_from([1e-4, 1e-3, 1e-2, 0.1]))
def test_float32_grams_move_the_ridge_head_by_at_most_the_stated_bound(seed, clients, ridge):
    """``||W32 - W|| <= delta / (1 - delta) ||W||`` with ``delta = u (1 + M / ridge)``, ``u = 2^-24`` (docs/architecture.md)."""
    rng = np.random.default_rng(seed)
    width, classes = int(rng.integers(8, 64)), 5
    scales = 10.0 ** rng.uniform(-3, 3, width)  # features of very different sizes
    exact = torch.zeros(width, width, dtype=torch.float64)
    rounded, cross = exact.clone(), torch.zeros(width, classes, dtype=torch.float64)
    for _ in range(clients):
        x = torch.from_numpy(np.maximum(rng.standard_normal((int(rng.integers(2, 2 * width)), width)), 0) * scales)
        gram = x.T @ x
        exact += unpack_upper(pack_upper(gram))  # the float64 triangle: only float32's rounding differs
        rounded += Packing(("G",), "float32").unpack(Packing(("G",), "float32").pack({"G": gram}))["G"]
        cross += x.T @ torch.from_numpy(np.eye(classes)[rng.integers(0, classes, len(x))])
    delta = U32 * (1 + width / ridge)
    head, head32 = ridge_head(exact, cross, ridge)["head.weight"], ridge_head(rounded, cross, ridge)["head.weight"]
    error = float(torch.linalg.matrix_norm(head32 - head)) / float(torch.linalg.matrix_norm(head))
    assert delta < 0.5 and error <= delta / (1 - delta)


def test_gram_dtype_takes_float32_or_float64_only():
    assert compose_config("config", []).replies.gram_dtype == "float32"
    with pytest.raises(ConfigError, match=r"^unknown replies.gram_dtype 'float16'; valid choices: float32, float64$"):
        check_settings(compose_config("config", ["replies.gram_dtype=float16"]))


def test_the_settings_offer_exactly_the_gram_dtypes_the_wire_knows():
    """fedcil.settings names the choices without importing torch; they must be the wire's."""
    from fedcil.protocol import GRAM_DTYPES
    from fedcil.settings import CHOICES

    assert set(CHOICES["replies.gram_dtype"]) == set(GRAM_DTYPES)
