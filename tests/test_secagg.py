"""Secure aggregation: the encoding's bound, the protocol's sums, dropouts, tampering and replays.

The clients here are the real client code (:func:`fedcil.secagg.client.respond`) answering
each node's requests through a post that delivers them in memory; only their plain reply
(what local training would have produced) is given, drawn at random.
"""

from __future__ import annotations

import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, MessageType, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.model import model_for
from fedcil.protocol import ClientUpdate, RoundPlan, encode_reply
from fedcil.secagg import masks
from fedcil.secagg.client import RECORD, SET_UP, VECTOR, ProtocolError, pairwise_sign, reply_vector, respond
from fedcil.secagg.encoding import FixedPoint, range_exponent
from fedcil.secagg.identity import Identity, fresh_federation, identity_of, openssh_public, sign_keys
from fedcil.secagg.server import SecAggSettings, neighbourhoods, outlying_exponents, rebuild_checked, threshold_of, tolerated_tampering
from fedcil.settings import check_settings
from fedcil.shapes import declared_shape
from fedcil.tasks import split_for
from server_app.federation import RoundExchange
from server_app.secure import exponent_caps, secure_sender
from server_app.validation import ReplyLimits, TooFewReplies
from strategies import build_strategy
from strategies.aggregation import sum_updates

LIMITS = ReplyLimits(max_examples=10_000, max_norm=1e13)
MICRO = ["num_clients=4", "num_tasks=2", "partition=iid"]
PLAIN_ANALYTIC = ["method.blocks=null", "method.projection_dim=0"]  # its first request asks for G and C (64 features)


def exact_sums(vectors: list[np.ndarray]) -> np.ndarray:
    """Per entry, the correctly rounded float64 sum (the reference of the error bound)."""
    return np.array([math.fsum(column) for column in zip(*vectors, strict=True)])


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    clients=st.integers(1, 50),
    scales=st.lists(st.integers(-9, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_a_sum_of_encodings_decodes_to_the_exact_sum_within_the_stated_bound(bits, clients, scales, seed):
    rng = np.random.default_rng(seed)
    sizes = tuple(int(rng.integers(1, 40)) for _ in scales)
    vectors = [np.concatenate([rng.standard_normal(n) * 10.0**s for n, s in zip(sizes, scales)]) for _ in range(clients)]
    bounds = np.cumsum([0, *sizes])
    exponents = tuple(max(range_exponent(v[bounds[i]:bounds[i + 1]]) for v in vectors) for i in range(len(sizes)))
    encoding = FixedPoint(bits, clients, exponents, sizes)
    total = np.zeros(encoding.length, dtype=encoding.dtype)
    for vector in vectors:
        total += encoding.encode(vector)
    error = np.abs(encoding.decode(total) - exact_sums(vectors))
    assert (error <= encoding.error_bound()).all()


def test_range_exponent_is_the_smallest_power_of_two_above_every_entry():
    for peak in (1.0, 1.5, 0.5, 3e6, 2.0**-40):
        e = range_exponent(np.array([peak, -peak / 3]))
        assert peak <= 2.0**e and not peak <= 2.0 ** (e - 1)


class Clients:
    """In-memory clients running the real client protocol on fixed plain replies.

    ``tamper(node, stage, reply)`` may change a reply or return None (the node drops out
    from that stage on); a client raising is an error reply, as Flower delivers it.
    """

    def __init__(self, replies: dict[int, RecordDict], tamper=None, identities: dict[int, Identity] | None = None) -> None:
        self.replies, self.tamper, self.identities = replies, tamper, identities or {}
        self.states = {node: RecordDict() for node in replies}
        self.gone: set[int] = set()
        self.requests: list[dict[int, RecordDict]] = []
        self.answers: list[tuple[int, str, RecordDict]] = []  # what reached the server
        self.refusals: list[str] = []

    def post(self, contents, kind) -> RoundExchange:
        self.requests.append(dict(contents))
        result = RoundExchange(replies=[], bytes_up=0, bytes_down=0, sampled=list(contents))
        for node, content in contents.items():
            if node in self.gone:
                result.failed[node] = "no reply before the round timeout"
                continue
            try:
                reply = respond(content, self.states[node], node, lambda _, n=node: self.replies[n], self.identities.get(node))
            except ProtocolError as exc:
                self.refusals.append(str(exc))
                result.failed[node] = f"client error: {exc}"
                continue
            stage = content.config_records[RECORD]["stage"]
            if self.tamper is not None:
                reply = self.tamper(node, stage, reply)
            if reply is None:
                self.gone.add(node)
                result.failed[node] = "no reply before the round timeout"
                continue
            self.answers.append((node, stage, reply))
            result.replies.append((node, reply))
        return result


def micro_strategy(method: str):
    cfg = compose_config("config", [*MICRO, f"method={method}", *(PLAIN_ANALYTIC if method == "analytic" else [])])
    shape = declared_shape(cfg.dataset)
    model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
    strategy = build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)
    strategy.start_task(0)
    return strategy


def random_replies(shapes: dict[str, tuple[int, ...]], nodes: range, rng: np.random.Generator) -> dict[int, tuple[dict[str, torch.Tensor], int, float]]:
    """Per node, tensors of ``shapes``, a count and a loss. Tensors span orders of magnitude from
    one name to the next and vary 100-fold between nodes (Grams positive semi-definite)."""
    scales = {name: 10.0 ** rng.uniform(-4, 6) for name in shapes}
    replies = {}
    for node in nodes:
        tensors = {}
        for name, shape in sorted(shapes.items()):
            scale = scales[name] * 10.0 ** rng.uniform(-1, 1)
            if name.endswith((".G", ".S")) or name == "G":
                rows = rng.standard_normal((2 * shape[0], shape[0]))
                value = (rows.T @ rows) * scale if len(shape) == 2 else rng.uniform(0, scale, shape)
            else:
                value = rng.standard_normal(shape) * scale
            tensors[name] = torch.tensor(value, dtype=torch.float32)
        replies[node] = (tensors, int(rng.integers(1, 500)), float(rng.uniform(0, 3)))
    return replies


def secure_and_plain(method: str, clients: int, seed: int, secagg: SecAggSettings, tamper=None):
    """A round of ``method``'s first plan, merged from plain replies and through secure aggregation."""
    plain, secure = micro_strategy(method), micro_strategy(method)
    plan = plain.configure_round(0, 0)
    rng = np.random.default_rng(seed)
    drawn = random_replies(plain.expected_reply(plan, 0), range(10, 10 + clients), rng)
    updates = [ClientUpdate(node, tensors, n, loss) for node, (tensors, n, loss) in drawn.items()]
    people = Clients({node: encode_reply(*reply) for node, reply in drawn.items()}, tamper)
    result = secure_sender(people.post, secure, secagg, LIMITS, 1)(plan, 0, 0, sorted(drawn))
    return plain, secure, plan, updates, result, people


@pytest.mark.parametrize("method", ["lorm", "fedavg_lora", "ffa_lora", "head_only", "analytic"])
@settings(max_examples=4, deadline=None)
@given(bits=st.sampled_from([64, 32]), clients=st.integers(2, 7), seed=st.integers(0, 2**31))
def test_the_secure_sum_equals_the_plain_aggregate_within_the_bound_for_every_supported_method(method, bits, clients, seed):
    plain, secure, plan, updates, result, _ = secure_and_plain(method, clients, seed, SecAggSettings(True, modulus_bits=bits))
    [total] = result.updates
    assert total.clients == clients and total.num_examples == sum(u.num_examples for u in updates)
    assert total.loss == pytest.approx(sum(u.num_examples * u.loss for u in updates) / total.num_examples, rel=1e-6)
    weighted = secure.secure_sum == "mean"
    count = total.num_examples
    for name, value in total.tensors.items():
        terms = [u.tensors[name].double().numpy().ravel() * (u.num_examples if weighted else 1) for u in updates]
        exponent = max(range_exponent(t) for t in terms)
        bound = FixedPoint(bits, clients, (exponent,), (terms[0].size,)).error_bound()
        reference = exact_sums(terms)
        if weighted:  # a mean: the sum's bound, divided by the count, plus float64's rounding of the division
            reference, bound = reference / count, bound / count + np.abs(reference / count) * 2.0**-52
        assert (np.abs(value.numpy().ravel() - reference) <= bound).all(), name
    # the strategy merges the one summed update as it merges the replies
    plain.aggregate_round(0, 0, updates)
    secure.aggregate_round(0, 0, result.updates)
    for name, value in plain.state.items():  # 32 bits: each entry within 1e-5 of its tensor's range
        scale = float(value.abs().max()) if bits == 32 else 0.0
        torch.testing.assert_close(secure.state[name], value, rtol=1e-6, atol=max(1e-6, 1e-5 * scale))


def test_the_server_sees_no_reply_only_keys_shares_and_masked_vectors():
    _, _, _, _, _, people = secure_and_plain("lorm", 3, 1, SecAggSettings(True))
    assert [len(requests) for requests in people.requests] == [3] * 5  # setup, share-keys, collect, consistency, unmask
    assert len(people.answers) == 15
    for node, stage, reply in people.answers:
        assert not reply.metric_records and list(reply.config_records) == [RECORD]
        assert list(reply.array_records) == ([VECTOR] if stage == "collect" else [])
    assert all(RECORD not in state.config_records and not state.array_records for state in people.states.values())
    # what a client keeps across rounds is the exchanges it has set up, nothing secret
    assert all(list(state.config_records) == [SET_UP] for state in people.states.values())


def client_vectors(bits: int, length: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(encoded, masked) vectors of one of 3 clients sending ``values``."""
    tensors = {"x": torch.tensor(values, dtype=torch.float32)}
    replies = {node: encode_reply(tensors, 1, 0.0) for node in (1, 2, 3)}
    captured = {}

    def keep(node, stage, reply):
        if stage == "collect" and node == 1:
            captured["masked"] = reply.array_records[VECTOR]["values"].numpy()
        return reply

    people = Clients(replies, keep)

    class One:
        secure_sum = "sum"

        def expected_reply(self, plan, task):
            return {"x": (length,)}

    secure_sender(people.post, One(), SecAggSettings(True, modulus_bits=bits), LIMITS, 1)(RoundPlan({}, ()), 0, 0, [1, 2, 3])
    encoding = FixedPoint(bits, 3, (range_exponent(values), -126, -126), (length, 1, 1))
    return encoding.encode(np.concatenate([values, [1.0, 0.0]]).astype(np.float64)), captured["masked"]


@pytest.mark.parametrize("bits", [64, 32])
def test_a_masked_vector_is_uncorrelated_with_the_vector_and_uniform(bits):
    length = 20_000
    values = np.linspace(-1.0, 1.0, length) ** 3  # a strongly structured vector
    encoded, masked = client_vectors(bits, length, values)
    top = 2.0 ** (bits - 1)
    assert np.abs(np.corrcoef(values, masked[:length].astype(np.float64))[0, 1]) < 4 / math.sqrt(length)
    assert np.abs(np.corrcoef(encoded[:length].astype(np.float64), masked[:length].astype(np.float64))[0, 1]) < 4 / math.sqrt(length)
    # uniform modulo 2**bits: the top bit is a fair coin, the mean is half the modulus
    share = float(np.mean(masked >= top))
    assert abs(share - 0.5) < 4 * 0.5 / math.sqrt(masked.size)
    assert abs(float(np.mean(masked.astype(np.float64))) / (2 * top) - 0.5) < 4 * 0.29 / math.sqrt(masked.size)


def test_a_client_that_drops_after_sharing_keys_is_recovered_from():
    def drop_after_sharing(node, stage, reply):
        return reply if not (node == 12 and stage == "collect") else None

    _, secure, _, updates, result, _ = secure_and_plain("analytic", 5, 2, SecAggSettings(True), drop_after_sharing)
    [total] = result.updates
    kept = [u for u in updates if u.node_id != 12]
    assert total.clients == 4 and total.num_examples == sum(u.num_examples for u in kept)
    for name, value in sum_updates(kept, ["G", "C"]).items():
        torch.testing.assert_close(total.tensors[name], value, rtol=1e-9, atol=1e-6)
    assert result.failed[12] == "no reply before the round timeout"


def test_too_many_dropouts_stop_the_round():
    def two_leave(node, stage, reply):
        return None if node in (10, 11, 12) and stage == "collect" else reply

    with pytest.raises(TooFewReplies, match="3 clients dropped out after sharing keys; node 1[34] has 2 surviving share holders, threshold 4"):
        secure_and_plain("analytic", 5, 3, SecAggSettings(True), two_leave)
    with pytest.raises(TooFewReplies, match="secagg.max_dropouts=0"):
        secure_and_plain("analytic", 5, 3, SecAggSettings(True, max_dropouts=0), lambda n, s, r: None if (n, s) == (12, "collect") else r)


def flip_byte(data: bytes, at: int = 40) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_a_tampered_share_ciphertext_is_rejected_by_its_recipient():
    def tamper(node, stage, reply):
        if node == 10 and stage == "share-keys":
            record = reply.config_records[RECORD]
            record["shares"] = [flip_byte(record["shares"][0]), *record["shares"][1:]]
        return reply

    _, _, _, updates, result, _ = secure_and_plain("analytic", 5, 4, SecAggSettings(True), tamper)
    victim = next(node for node, reason in result.failed.items() if "does not decrypt" in reason)
    kept = [u for u in updates if u.node_id != victim]
    [total] = result.updates
    assert total.clients == 4
    torch.testing.assert_close(total.tensors["C"], sum_updates(kept, ["C"])["C"], rtol=1e-9, atol=1e-6)


def scrambled(share: bytes) -> bytes:
    """A Shamir share whose first chunk (after the 4-byte index) is replaced by random bytes.

    Each tampered share gets its own error: the same error in several shares can cancel out
    in the Lagrange sum over GF(2^128) and rebuild the right secret.
    """
    return share[:4] + os.urandom(16) + share[20:]


def test_a_tampered_unmasking_share_is_outvoted_or_stops_the_round():
    def wrong_seed_share(node, stage, reply):
        if node == 10 and stage == "unmask":
            record = reply.config_records[RECORD]
            record["seed-shares"] = [scrambled(share) for share in record["seed-shares"]]
        return reply

    _, _, _, updates, result, _ = secure_and_plain("analytic", 5, 5, SecAggSettings(True), wrong_seed_share)
    torch.testing.assert_close(result.updates[0].tensors["C"], sum_updates(updates, ["C"])["C"], rtol=1e-9, atol=1e-6)

    def all_wrong(node, stage, reply):
        return wrong_seed_share(10, stage, reply) if node in (10, 11, 12) else reply

    with pytest.raises(TooFewReplies, match="rebuild its committed secret"):
        secure_and_plain("analytic", 5, 5, SecAggSettings(True), all_wrong)


def test_replayed_or_inconsistent_messages_are_refused():
    # a reply replayed from another round (another session) is dropped by the server
    earlier = {}

    def replay(node, stage, reply):
        if stage == "setup" and node == 10:
            earlier.setdefault("reply", reply)
        return reply

    secure_and_plain("analytic", 3, 6, SecAggSettings(True), replay)
    _, _, _, _, result, _ = secure_and_plain("analytic", 4, 6, SecAggSettings(True),
                                             lambda n, s, r: earlier["reply"] if (n, s) == (10, "setup") else r)
    assert "another stage or round" in result.failed[10]
    # a client refuses a stage out of order, a replayed unmasking, and a request for both secrets of one client
    _, _, _, _, _, people = secure_and_plain("analytic", 3, 7, SecAggSettings(True))
    collect, unmask = people.requests[2], people.requests[3]
    with pytest.raises(ProtocolError, match="without a round in progress"):
        respond(unmask[10], people.states[10], 10, lambda _: None)
    with pytest.raises(ProtocolError, match="without a round in progress"):
        respond(collect[10], people.states[10], 10, lambda _: None)
    # a server relaying signatures of another survivor set than the one a client signed gets nothing from it
    honest = Clients(dict(people.replies))

    def other_set(contents, kind):
        for content in contents.values():
            record = content.config_records[RECORD]
            if record["stage"] == "consistency":
                record["survivors"] = [*record["survivors"], "99"]
                break  # one client is told a set with a client that never was
        return honest.post(contents, kind)

    strategy = micro_strategy("analytic")
    with pytest.raises(TooFewReplies, match="secagg stage consistency: 2 valid answers, 3 needed"):
        secure_sender(other_set, strategy, SecAggSettings(True), LIMITS, 3)(strategy.configure_round(0, 0), 0, 0, sorted(people.replies))
    strategy, honest = micro_strategy("analytic"), Clients(dict(people.replies))
    with pytest.raises(TooFewReplies, match="secagg stage unmask: 0 valid answers"):
        secure_sender(other_set, strategy, SecAggSettings(True), LIMITS, 1)(strategy.configure_round(0, 0), 0, 0, sorted(people.replies))
    # the server drops the client whose signature is of another set; the other two then lack its signature
    assert len(honest.refusals) == 2 and all("2 of this client's share holders signed the survivor set it signed, fewer than "
                                             "the threshold 3" in r for r in honest.refusals)


def test_a_secagg_plus_ring_gives_the_same_sum_and_is_symmetric():
    ring = neighbourhoods(list(range(9)), 4, b"session")
    assert all(len(others) == 4 and all(node in ring[other] for other in others) for node, others in ring.items())
    assert {n: sorted(others) for n, others in neighbourhoods(list(range(4)), None, b"s").items()} == {
        n: [m for m in range(4) if m != n] for n in range(4)}
    _, _, _, updates, result, _ = secure_and_plain("analytic", 7, 8, SecAggSettings(True, num_neighbours=2, threshold=0.6))
    torch.testing.assert_close(result.updates[0].tensors["G"], sum_updates(updates, ["G"])["G"], rtol=1e-9, atol=1e-6)
    assert threshold_of(3, 0.6) == 3 and threshold_of(4, 0.51) == 3 and threshold_of(5, 0.6) == 4 and threshold_of(11, 0.6) == 7


def test_shares_rebuild_keys_and_masks_cancel():
    private, public = masks.new_key_pair()
    other_private, other_public = masks.new_key_pair()
    assert masks.shared_secret(private, other_public) == masks.shared_secret(other_private, public)
    shares = masks.split_secret(private, 3, 5)
    assert masks.rebuild_secret(shares[2:]) == private and masks.public_of(masks.rebuild_secret(shares[:3])) == public
    a = masks.mask(b"seed", b"s1", 1000, 64)
    assert (a == masks.mask(b"seed", b"s1", 1000, 64)).all() and not (a == masks.mask(b"seed", b"s2", 1000, 64)).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=fedex_lora"], "methods that support it: analytic, fedavg_lora, ffa_lora, head_only, lorm"),
        (["method=talora"], "method=talora merges each client's own factors"),
    ],
)
def test_methods_that_need_each_clients_factors_refuse_secagg(overrides, message):
    cfg = compose_config("config", [*MICRO, "secagg.enabled=true", "replies.weighting=claimed", "replies.update_factor=null", *overrides])
    shape = declared_shape(cfg.dataset)
    model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
    with pytest.raises(ConfigError, match=message):
        build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["replies.clip_norm=1.0"], "replies.clip_norm clips each client's update"),
        (["num_clients=1"], "a sum of one reply is that reply"),
        (["secagg.num_neighbours=3"], "secagg.num_neighbours=3 is odd"),
        (["secagg.threshold=0.5"], "secagg.threshold=0.5 is out of range"),
        (["num_clients=50", "secagg.num_neighbours=10"], r"secagg.threshold=0.6 with a ring \(secagg.num_neighbours=10\); allowed: at least 2/3"),
        (["secagg.modulus_bits=16"], "unknown secagg.modulus_bits 16; valid choices: 32, 64"),
        (["method=analytic", "rounds_per_task=2"], "method=analytic and rounds_per_task=2: its statistics repeat every round"),
    ],
)
def test_bad_secagg_settings_fail_in_one_line(overrides, message):
    cfg = compose_config("config", [*MICRO, "secagg.enabled=true", "replies.weighting=claimed", "replies.update_factor=null", *overrides])
    with pytest.raises(ConfigError, match=message) as error:
        check_settings(cfg)
    assert "\n" not in str(error.value)


def test_kind_of_messages_is_kept():
    """Evaluation requests travel as evaluate messages through every stage."""
    kinds = []
    strategy = micro_strategy("lorm")
    plan = strategy.evaluation_plan()
    people = Clients({n: encode_reply({"eval.correct": torch.tensor([3.0]), "eval.count": torch.tensor([7.0])}, 7, 0.0) for n in (1, 2)})

    def post(contents, kind):
        kinds.append(kind)
        return people.post(contents, kind)

    result = secure_sender(post, strategy, SecAggSettings(True), LIMITS, 1)(plan, 0, 0, [1, 2])
    assert kinds == [MessageType.EVALUATE] * 5
    assert result.updates[0].tensors["eval.correct"].tolist() == [6.0] and result.updates[0].tensors["eval.count"].tolist() == [14.0]


def test_a_server_re_running_one_exchange_over_fewer_clients_to_subtract_the_sums_is_refused():
    """Finding: the same request summed over S and over S minus X gives X's reply by subtraction."""
    strategy = micro_strategy("analytic")
    plan = strategy.configure_round(0, 0)
    rng = np.random.default_rng(9)
    people = Clients({node: encode_reply(*reply) for node, reply in random_replies(strategy.expected_reply(plan, 0), range(10, 14), rng).items()})
    send = secure_sender(people.post, strategy, SecAggSettings(True), LIMITS, 1)
    send(plan, 0, 0, [10, 11, 12, 13])
    with pytest.raises(TooFewReplies, match="secagg stage setup: 0 valid answers"):
        send(plan, 0, 0, [10, 11, 12])
    assert len(people.refusals) == 3 and all("exchange 0/0/statistics:" in r and "set up before" in r for r in people.refusals)
    # nor under another round number: the analytic statistics do not change with the round
    with pytest.raises(TooFewReplies, match="secagg stage setup: 0 valid answers"):
        send(plan, 0, 1, [10, 11, 12])
    assert len(people.refusals) == 6 and all("repeats the request" in r for r in people.refusals[3:])
    # the same clients go on with the run's next exchanges: the next task, and an evaluation
    assert send(strategy.configure_round(1, 0), 1, 0, [10, 11, 12]).updates[0].clients == 3
    evaluation = Clients({n: encode_reply({"eval.correct": torch.tensor([3.0]), "eval.count": torch.tensor([7.0])}, 7, 0.0) for n in (10, 11)})
    evaluation.states = people.states
    lorm = micro_strategy("lorm")
    assert secure_sender(evaluation.post, lorm, SecAggSettings(True), LIMITS, 1)(lorm.evaluation_plan(), 0, 0, [10, 11]).updates[0].clients == 2


@pytest.mark.parametrize("bits", [64, 32])
def test_one_client_claiming_the_largest_range_is_left_out_instead_of_zeroing_the_sum(bits):
    """Finding: the server took the round's largest exponent, so one claim of the cap rounded every entry to 0."""
    def claims_the_cap(node, stage, reply):
        if (node, stage) == (10, "setup"):
            record = reply.config_records[RECORD]
            record["exponents"] = exponent_caps(record["names"], LIMITS, weighted=False)
        return reply

    _, _, _, updates, result, _ = secure_and_plain("analytic", 5, 10, SecAggSettings(True, modulus_bits=bits), claims_the_cap)
    honest = [u for u in updates if u.node_id != 10]
    [total] = result.updates
    for name, value in sum_updates(honest, ["G", "C"]).items():
        torch.testing.assert_close(total.tensors[name], value, rtol=1e-6 if bits == 32 else 1e-9, atol=1e-6 * float(value.abs().max()))
    assert total.clients == 4 and total.num_examples == sum(u.num_examples for u in honest)
    assert "secagg.exponent_slack=12 bits above the round's median" in result.failed[10]


def test_range_exponents_far_above_the_median_are_outliers_and_all_zero_tensors_set_no_median():
    zero = -126
    exponents = {1: [3, zero, 0], 2: [5, zero, 1], 3: [15, 40, 2], 4: [16, zero, 13], 5: [4, zero, 1]}
    # medians (the lower one, of non-zero tensors): 5, 40, 1; slack 11 leaves out node 4 (its third tensor: 13 > 1 + 11)
    assert outlying_exponents(exponents, 11) == {4: (2, 13, 1)}
    assert outlying_exponents(exponents, 9) == {3: (0, 15, 5), 4: (0, 16, 5)}
    assert outlying_exponents(exponents, 12) == {}


def rebuilt_despite(tampered: set[int], holders: int, threshold: int, secret_bytes: int = masks.SEED_BYTES) -> bool:
    """Whether a committed secret split among ``holders`` is rebuilt when the shares at positions ``tampered`` are scrambled."""
    secret = os.urandom(secret_bytes)
    shares = [scrambled(share) if i in tampered else share for i, share in enumerate(masks.split_secret(secret, threshold, holders))]
    return rebuild_checked(shares, threshold, lambda s: masks.commitment(s) == masks.commitment(secret), 0) == secret


@pytest.mark.parametrize("holders", [10, 20, 50])
def test_a_tampered_share_at_any_position_is_outvoted(holders):
    """Finding: 64 combinations in order never left out a share among the first ones (10 holders, t = 6: position 0 or 1)."""
    threshold = threshold_of(holders, 0.6)
    assert tolerated_tampering(holders, threshold) == 2 == tolerated_tampering(holders, threshold_of(holders, 2 / 3))
    length = masks.SEED_BYTES if holders < 50 else 15  # one 16-byte block of Shamir shares instead of three: 3 times faster
    assert all(rebuilt_despite({position}, holders, threshold, length) for position in range(holders))


@settings(max_examples=25, deadline=None)
@given(holders=st.integers(3, 16), share=st.floats(0.51, 1.0), data=st.data())
def test_up_to_the_tolerated_number_of_tampered_shares_anywhere_are_outvoted(holders, share, data):
    threshold = threshold_of(holders, share)
    tolerated = tolerated_tampering(holders, threshold)
    assert tolerated >= min(1, holders - threshold)
    tampered = data.draw(st.sets(st.integers(0, holders - 1), max_size=tolerated))
    assert rebuilt_despite(tampered, holders, threshold, secret_bytes=15)


def most_matched(demand: dict[int, int], candidates: dict[int, list[int]], capacity: int) -> dict[int, set[int]]:
    """Per candidate, the demands it serves: each demand ``d`` served by ``demand[d]`` of ``candidates[d]``,
    each candidate serving at most ``capacity``; a maximum flow (augmenting paths), as much as can be served."""
    served: dict[int, set[int]] = {}
    for need, count in demand.items():
        for _ in range(count):
            parents, frontier, found = {("d", need): None}, [("d", need)], None
            while frontier and found is None:  # breadth-first: demand -> candidate (not serving it) -> a demand it serves ...
                step = []
                for kind, at in frontier:
                    nexts = [("c", c) for c in candidates[at] if at not in served.get(c, set())] if kind == "d" else \
                        [("d", d) for d in served.get(at, set())]
                    for nxt in nexts:
                        if nxt not in parents:
                            parents[nxt] = (kind, at)
                            if nxt[0] == "c" and len(served.get(nxt[1], set())) < capacity:
                                found = nxt
                            step.append(nxt)
                frontier = step
            if found is None:
                continue
            node = found
            while parents[node] is not None:  # flip the path: candidates take the demand before them, give the one after
                parent = parents[node]
                if node[0] == "c":
                    served.setdefault(node[1], set()).add(parent[1])
                else:
                    served[parent[1]].discard(node[1])
                node = parent
    return served


def lie_about_dropouts(share: float) -> tuple[np.ndarray | None, np.ndarray, set[int], dict[int, str]]:
    """Finding: the server tells ``t`` holders of each neighbour ``Y`` of a target ``X`` that ``Y``
    dropped (so they send ``Y``'s mask-key shares) and ``X``'s holders that ``X`` survived (its
    seed shares), and strips ``X``'s masks. 50 clients, a ring of 10 neighbours; the real client
    code answers. Returns what the server recovered of ``X``'s encoded vector (None: not enough
    shares), the vector itself, the clients told a lie, and the clients' refusals to unmask."""
    rng = np.random.default_rng(23)
    nodes, session, degree = list(range(50)), os.urandom(16), 10
    neighbours = neighbourhoods(nodes, degree, session)
    threshold = threshold_of(degree + 1, share)
    plain = {n: encode_reply({"x": torch.tensor(rng.standard_normal(8), dtype=torch.float32)}, 1, 0.0) for n in nodes}
    states = {n: RecordDict() for n in nodes}
    refusals: dict[tuple[int, str], str] = {}

    def ask(node: int, stage: str, **fields) -> RecordDict | None:
        content = RecordDict({RECORD: ConfigRecord({"stage": stage, "session": session, **fields})})
        content["config"] = ConfigRecord({"task": 0, "round": 0, "train-groups": []})
        try:
            reply = respond(content, states[node], node, lambda _: plain[node])
        except ProtocolError as exc:
            refusals[node, stage] = str(exc)
            return None
        return reply

    keys = {n: ask(n, "setup", bits=64, weighted=False).config_records[RECORD] for n in nodes}
    exponents = [max(keys[n]["exponents"][i] for n in nodes) for i in range(3)]
    shares = {}
    for n in nodes:
        others = neighbours[n]
        record = ask(n, "share-keys", neighbours=[str(m) for m in others], threshold=threshold, exponents=exponents, clients=50,
                     **{f"{kind}s": [keys[m][kind] for m in others] for kind in keys[n] if kind.endswith("-key")})
        shares[n] = dict(zip(others, record.config_records[RECORD]["shares"]))
    masked = {n: ask(n, "collect", sources=[str(m) for m in neighbours[n]], shares=[shares[m][n] for m in neighbours[n]])
              for n in nodes}
    # the lie: holders told that a neighbour of the target dropped, at most k - t each (else they refuse)
    target = nodes[0]
    told = most_matched({y: threshold for y in neighbours[target]}, {y: neighbours[y] for y in neighbours[target]},
                        degree + 1 - threshold)
    signatures = {}
    for n in nodes:  # the consistency round, where clients have it: each signs the set it is told
        reply = ask(n, "consistency", survivors=[str(m) for m in nodes if m not in told.get(n, set())])
        if reply is not None:
            signatures[n] = reply.config_records[RECORD]["signature"]
    answers = {}
    for n in nodes:
        holders = [n, *neighbours[n]]
        reply = ask(n, "unmask", survivors=[str(m) for m in holders if m not in told.get(n, set())],
                    dropped=[str(m) for m in told.get(n, set())],
                    signers=[str(m) for m in holders if m in signatures], signatures=[signatures[m] for m in holders if m in signatures])
        if reply is not None:
            answers[n] = reply.config_records[RECORD]
    seed_shares = [a["seed-shares"][list(map(int, a["seed-owners"])).index(target)] for a in answers.values()
                   if str(target) in a["seed-owners"]]
    key_shares = {y: [a["key-shares"][list(map(int, a["key-owners"])).index(y)] for a in answers.values() if str(y) in a["key-owners"]]
                  for y in neighbours[target]}
    encoding = FixedPoint(64, 50, tuple(exponents), (8, 1, 1))
    _, _, vector = reply_vector(plain[target], False)
    refused = {n: r for (n, stage), r in refusals.items() if stage == "unmask"}
    if len(seed_shares) < threshold or any(len(s) < threshold for s in key_shares.values()):
        return None, encoding.encode(vector), set(told), refused
    total = masked[target].array_records[VECTOR]["values"].numpy() - masks.mask(masks.rebuild_secret(seed_shares), session, 10, 64)
    for y, key in key_shares.items():
        private = masks.private_from_scalar(masks.rebuild_secret(key))
        pairwise = masks.mask(masks.shared_secret(private, keys[target]["mask-key"]), session, 10, 64)
        total = total - pairwise if pairwise_sign(target, y) > 0 else total + pairwise
    return total, encoding.encode(vector), set(told), refused


def test_a_server_lying_about_dropouts_in_a_ring_recovers_nothing():
    """50 clients, 10 neighbours, threshold 0.6 (7 of 11): before the consistency round the server
    recovered the target's encoded vector exactly, with no client refusing."""
    recovered, vector, told, refusals = lie_about_dropouts(0.6)
    assert recovered is None, "the server recovered the target's vector" + " exactly" * np.array_equal(recovered, vector)
    assert told <= set(refusals) and all("signed the survivor set it signed" in r for r in refusals.values())


def test_clients_refuse_a_threshold_of_half_their_holders_plus_one_half():
    """With t <= (k + 1) / 2, a server could tell X and t - 1 holders that X survived (its seed) and X
    that its other k - t neighbours did not share keys, whose keys those same t holders would reveal."""
    replies = {n: encode_reply({"x": torch.ones(3)}, 1, 0.0) for n in range(5)}
    people = Clients(replies)

    def low_threshold(contents, kind):
        for content in contents.values():
            if content.config_records[RECORD]["stage"] == "share-keys":
                content.config_records[RECORD]["threshold"] = 3
        return people.post(contents, kind)

    class One:
        secure_sum = "sum"

        def expected_reply(self, plan, task):
            return {"x": (3,)}

    with pytest.raises(TooFewReplies, match="secagg stage share-keys: 0 valid answers"):
        secure_sender(low_threshold, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    assert len(people.refusals) == 5 and all("threshold 3 for 5 share holders; allowed: more than (holders + 1) / 2" in r
                                             for r in people.refusals)


class One:
    """A method whose replies are one tensor ``x`` of 3 entries, summed."""

    secure_sum = "sum"

    def expected_reply(self, plan, task):
        return {"x": (3,)}


def test_authenticated_keys_give_the_same_sum_and_are_counted_in_the_round():
    replies = {n: encode_reply({"x": torch.tensor([n, 2.0 * n, -1.0])}, 1, 0.0) for n in range(5)}
    people = Clients(replies, identities=fresh_federation(replies))
    result = secure_sender(people.post, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    assert torch.allclose(result.updates[0].tensors["x"].double(), torch.tensor([10.0, 20.0, -5.0], dtype=torch.float64))
    assert result.authenticated == 5 and not people.refusals
    plain = secure_sender(Clients(replies).post, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    assert plain.authenticated == 0


class Stop(Exception):
    """The lying server has what it came for."""


def swap_keys(identities: dict[int, Identity], lie: str) -> tuple[bytes | None, bytes, list[str]]:
    """Finding: the server relays public keys, so it can give a client its own encryption key in place of
    each neighbour's and open every share the client sends them. The server here lies to victim 0 (five
    clients, every pair linked, threshold 4 of 5) in one of several ways, then rebuilds what it can of the
    victim's self-mask seed from the shares it opened. Returns (rebuilt seed or None, the victim's seed
    commitment, the clients' refusals)."""
    replies = {n: encode_reply({"x": torch.ones(3)}, 1, 0.0) for n in range(5)}
    people = Clients(replies, identities=identities)
    spy_private, spy_public = masks.new_key_pair()
    spy_identity = ec.generate_private_key(ec.SECP384R1())
    victim, opened = 0, []

    def lying_post(contents, kind):
        stage = next(iter(contents.values())).config_records[RECORD]["stage"]
        if stage == "share-keys":
            request = contents[victim].config_records[RECORD]
            others = [int(m) for m in request["neighbours"]]
            if lie == "strip signatures":
                del request["identity-keys"], request["identity-signatures"]
            elif lie == "other node ids":  # each neighbour's true, signed keys, presented under the next neighbour's id
                for kind_ in ("encryption-keys", "mask-keys", "signing-keys", "identity-keys", "identity-signatures"):
                    request[kind_] = request[kind_][1:] + request[kind_][:1]
            else:
                request["encryption-keys"] = [spy_public] * len(others)
                if lie == "own identity":  # signed, by a key the server holds but nobody registered
                    keys = {"encryption-key": spy_public}
                    request["identity-keys"] = [openssh_public(spy_identity.public_key())] * len(others)
                    request["identity-signatures"] = [
                        sign_keys(Identity(spy_identity, frozenset()), request["session"], m,
                                  {**keys, "mask-key": request["mask-keys"][i], "signing-key": request["signing-keys"][i]})
                        for i, m in enumerate(others)]
        result = people.post(contents, kind)
        if stage == "share-keys":
            for node, reply in result.replies:
                if node == victim:
                    opened.extend(reply.config_records[RECORD]["shares"])
            raise Stop
        return result

    with pytest.raises(Stop):
        secure_sender(lying_post, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    setup = next(reply for node, stage, reply in people.answers if node == victim and stage == "setup").config_records[RECORD]
    seed_shares = []
    for ciphertext in opened:
        try:
            _, _, seed_share, _ = masks.open_shares(masks.shared_secret(spy_private, setup["encryption-key"]), ciphertext)
        except Exception:  # not encrypted for the spy's key
            continue
        seed_shares.append(seed_share)
    seed = masks.rebuild_secret(seed_shares) if len(seed_shares) >= 4 else None
    return seed, setup["seed-commitment"], people.refusals


def test_a_server_swapping_public_keys_opens_the_shares_unless_keys_are_authenticated():
    seed, commitment, refusals = swap_keys({}, "swap")
    assert seed is not None and masks.commitment(seed) == commitment and not refusals  # the attack, without identities
    seed, _, refusals = swap_keys(fresh_federation(range(5)), "swap")
    assert seed is None and len(refusals) == 1
    assert re.fullmatch(r"secagg neighbour \d+'s keys do not verify against its SuperNode key for this round and node id", refusals[0])


@pytest.mark.parametrize("lie, refusal", [
    ("own identity", r"secagg neighbour \d+'s keys are signed by no registered SuperNode key"),
    ("strip signatures", r"secagg neighbours' keys come without their SuperNode keys' signatures"),
    ("other node ids", r"secagg neighbour \d+'s keys do not verify against its SuperNode key for this round and node id"),
])
def test_a_server_lying_about_signed_keys_is_refused(lie, refusal):
    seed, _, refusals = swap_keys(fresh_federation(range(5)), lie)
    assert seed is None and len(refusals) == 1 and re.match(refusal, refusals[0])


def test_a_client_refuses_keys_signed_by_a_node_it_does_not_trust_or_twice_by_one():
    """A fake client the server adds with a key of its own is refused; so is one node's key used for two neighbours."""
    identities, fake = fresh_federation(range(4)), ec.generate_private_key(ec.SECP384R1())
    identities[4] = Identity(fake, identities[0].trusted | {openssh_public(fake.public_key())})  # it trusts itself
    replies = {n: encode_reply({"x": torch.ones(3)}, 1, 0.0) for n in range(5)}
    people = Clients(replies, identities=identities)
    with pytest.raises(TooFewReplies):
        secure_sender(people.post, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    assert sum("secagg neighbour 4's keys are signed by no registered SuperNode key" in r for r in people.refusals) == 4
    twice = {**identities, 4: Identity(identities[3].private, identities[0].trusted)}
    people = Clients(replies, identities=twice)
    with pytest.raises(TooFewReplies):
        secure_sender(people.post, One(), SecAggSettings(True), LIMITS, 1)(RoundPlan({}, ()), 0, 0, sorted(replies))
    assert any("signed by a key already used" in r for r in people.refusals)


def test_the_environment_names_both_key_files_which_must_hold_matching_elliptic_curve_keys(tmp_path):
    for i in (0, 1):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"node {i}", "-f", str(tmp_path / f"node-{i}")],
                       check=True)
    trusted = tmp_path / "trusted.pub"
    trusted.write_text("# registered SuperNodes\n" + "".join((tmp_path / f"node-{i}.pub").read_text() for i in (0, 1)))
    config = {"FEDCIL_SECAGG_IDENTITY_KEY": str(tmp_path / "node-0"), "FEDCIL_SECAGG_TRUSTED_KEYS": str(trusted)}
    identity = identity_of(config)
    assert identity is not None and len(identity.trusted) == 2 and identity.public in identity.trusted
    assert identity_of({"HOME": "/root"}) is None
    with pytest.raises(ConfigError, match="^FEDCIL_SECAGG_IDENTITY_KEY is set without FEDCIL_SECAGG_TRUSTED_KEYS"):
        identity_of({"FEDCIL_SECAGG_IDENTITY_KEY": config["FEDCIL_SECAGG_IDENTITY_KEY"]})
    with pytest.raises(ConfigError, match=f"^FEDCIL_SECAGG_IDENTITY_KEY={tmp_path}/missing: No such file"):
        identity_of({**config, "FEDCIL_SECAGG_IDENTITY_KEY": str(tmp_path / "missing")})
    (tmp_path / "other.pub").write_text((tmp_path / "node-1.pub").read_text())
    with pytest.raises(ConfigError, match="does not hold the public key of FEDCIL_SECAGG_IDENTITY_KEY="):
        identity_of({**config, "FEDCIL_SECAGG_TRUSTED_KEYS": str(tmp_path / "other.pub")})
    (tmp_path / "bad.pub").write_text("ecdsa-sha2-nistp384 notbase64\n")
    with pytest.raises(ConfigError, match="bad.pub line 1: not an OpenSSH public key"):
        identity_of({**config, "FEDCIL_SECAGG_TRUSTED_KEYS": str(tmp_path / "bad.pub")})
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ed")], check=True)
    with pytest.raises(ConfigError, match="valid choices: an elliptic-curve key"):
        identity_of({**config, "FEDCIL_SECAGG_IDENTITY_KEY": str(tmp_path / "ed")})
