"""Secure aggregation of a round's replies: the server learns their sum and nothing else.

:func:`secure_sender` is the ServerApp's :data:`~server_app.loop.Send` when
``secagg.enabled``: every request (training, a method's statistics, evaluation) goes through
the five stages of :mod:`fedcil.secagg.client`, and the round's result holds one update, the
sum of the survivors' replies (:class:`~fedcil.protocol.ClientUpdate` with ``clients`` set).
A method declares how its replies add up (``FederatedStrategy.secure_sum``): ``sum`` for
statistics (LoRM's summaries, the analytic Grams, evaluation counts), ``mean`` for
sample-weighted averages (clients send ``n_k * T_k`` and ``n_k``; the sum is divided by
``sum_k n_k``), so the strategy merges the one update exactly as it merges many. Packed Grams
(:class:`~fedcil.protocol.Packing`) are summed packed and the sum unpacked (:func:`summed_update`).

What can still be checked is checked: every stage's reply (its stage, its round, the types
and sizes of its fields, the range exponents it reveals within ``replies``' bounds and
``secagg.exponent_slack`` bits of the round's median, its signature of the survivor set), and
the recovered sum as :func:`server_app.validation.checked` checks a reply, with the bounds
scaled to the number of clients in it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.common.logger import log
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedcil.protocol import ClientUpdate, Packing, RoundPlan, Shapes, encode_request
from fedcil.secagg import masks
from fedcil.secagg.client import COUNT, LOSS, RECORD, VECTOR
from fedcil.secagg.encoding import MIN_EXPONENT, FixedPoint
from fedcil.secagg.identity import SIGNED_KEYS, signed_by
from fedcil.secagg.server import SecAggFailed, SecAggSettings, neighbourhoods, outlying_exponents, threshold_of, unmasked_sum
from server_app.federation import Post, RoundExchange, Send
from server_app.influence import sanity_problem
from server_app.validation import InvalidReply, ReplyLimits, TooFewReplies, checked
from strategies import FederatedStrategy

SESSION_BYTES = 16
T = TypeVar("T")


def field(record: ConfigRecord, name: str, kind: type, count: int | None = None) -> object:
    """``record[name]``, which must be a ``kind`` (or a list of ``count`` of them when ``count`` is given)."""
    value = record.get(name)
    if count is None:
        if type(value) is not kind:
            raise InvalidReply(f"{name} is not a {kind.__name__}")
        return value
    if not isinstance(value, list) or len(value) != count or any(type(v) is not kind for v in value):
        raise InvalidReply(f"{name} is not a list of {count} {kind.__name__} values")
    return value


def stage_record(content: RecordDict, stage: str, session: bytes) -> ConfigRecord:
    """The reply's secure-aggregation record, which must answer ``stage`` of this round."""
    if RECORD not in content.config_records:
        raise InvalidReply("no secagg record")
    record = content.config_records[RECORD]
    if record.get("stage") != stage or record.get("session") != session:
        raise InvalidReply(f"answers another stage or round than {stage!r} of this one")
    return record


def exponent_caps(names: Sequence[str], limits: ReplyLimits, weighted: bool) -> list[int]:
    """The largest range exponent each segment may reveal: what ``replies``' bounds allow an entry."""
    tensor = limits.max_norm * (limits.max_examples if weighted else 1)
    bounds = {COUNT: limits.max_examples, LOSS: limits.max_examples * limits.max_norm}
    return [math.ceil(math.log2(bounds.get(name, tensor))) for name in names]


def layout_of(expected: Shapes) -> tuple[list[str], list[int]]:
    """The names and sizes of the segments of a reply with tensors ``expected``."""
    names = sorted(expected)
    return [*names, COUNT, LOSS], [math.prod(expected[n]) for n in names] + [1, 1]


class SecureRound:
    """One secure exchange: the requests of each stage, the checks of each reply, the sum."""

    def __init__(self, post: Post, settings: SecAggSettings, limits: ReplyLimits, needed: int, kind: str) -> None:
        self.post, self.settings, self.limits, self.needed, self.kind = post, settings, limits, needed, kind
        self.session = os.urandom(SESSION_BYTES)
        self.result = RoundExchange(replies=[], bytes_up=0, bytes_down=0, sampled=[])

    def exchange(self, stage: str, requests: Mapping[int, RecordDict], check: Callable[[int, RecordDict], T]) -> dict[int, T]:
        """Send each node its request of ``stage``; ``check(node, reply)`` of every reply that answers it.

        A reply for another stage or round, or one ``check`` rejects (whatever it raises), leaves
        its node out of the round; fewer than ``needed`` nodes left stop the run.
        """
        exchanged = self.post(requests, self.kind)
        self.result.bytes_up += exchanged.bytes_up
        self.result.bytes_down += exchanged.bytes_down
        self.result.failed.update(exchanged.failed)
        kept = {}
        for node, content in exchanged.replies:
            try:
                stage_record(content, stage, self.session)
                kept[node] = check(node, content)
            except Exception as exc:  # whatever a client's bytes make the checks raise
                self.leave_out(node, f"invalid secagg {stage} reply: {exc}")
        self.require(stage, kept)
        return kept

    def leave_out(self, node: int, reason: str) -> None:
        self.result.failed[node] = reason
        log(WARNING, "node %s left out of the secure sum: %s", node, reason)

    def require(self, stage: str, kept: Mapping[int, object]) -> None:
        """Stop the run when fewer than ``needed`` nodes are left after ``stage``."""
        if len(kept) < self.needed:
            raise TooFewReplies(f"secagg stage {stage}: {len(kept)} valid answers, {self.needed} needed; stopping "
                                "(the checkpoint of the last finished round is kept)")

    def request(self, stage: str, **fields: object) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({"stage": stage, "session": self.session, **fields})})  # type: ignore[arg-type]

    def run(self, request: RecordDict, nodes: list[int], expected: Shapes, weighted: bool) -> tuple[np.ndarray, int]:
        """The float64 sum of the surviving clients' reply vectors, and how many clients it adds up."""
        self.result.sampled = nodes
        bits = self.settings.modulus_bits
        names, sizes = layout_of(expected)
        caps = exponent_caps(names, self.limits, weighted)
        setup = request
        setup[RECORD] = self.request("setup", bits=bits, weighted=weighted)[RECORD]

        def check_setup(node: int, content: RecordDict) -> dict:
            record = content.config_records[RECORD]
            if field(record, "names", str, len(names)) != names or field(record, "sizes", int, len(sizes)) != sizes:
                raise InvalidReply("its reply's layout differs from the request's")
            exponents = field(record, "exponents", int, len(names))
            if any(not MIN_EXPONENT <= e <= cap for e, cap in zip(exponents, caps)):
                raise InvalidReply("a range exponent is outside what replies.max_norm and replies.max_examples allow")
            keys = {key: field(record, key, bytes) for key in (*SIGNED_KEYS, "seed-commitment")}
            for key in SIGNED_KEYS:
                bytes_to_public_key(keys[key])
            if len(keys["seed-commitment"]) != 32:
                raise InvalidReply("seed-commitment is not 32 bytes")
            signed = {key: field(record, key, bytes) if key in record else b"" for key in ("identity-key", "identity-signature")}
            if signed["identity-key"] and not signed_by(signed["identity-key"], signed["identity-signature"], self.session, node, keys):
                raise InvalidReply("its keys' identity signature does not verify")
            return {**keys, **signed, "exponents": exponents}

        keys = self.exchange("setup", {n: setup for n in nodes}, check_setup)
        slack = self.settings.exponent_slack
        for node, (i, exponent, median) in outlying_exponents({n: k["exponents"] for n, k in keys.items()}, slack).items():
            self.leave_out(node, f"range exponent {exponent} of {names[i]} is more than secagg.exponent_slack={slack} "
                                 f"bits above the round's median {median}")
            del keys[node]
        self.require("setup", keys)
        joined = sorted(keys)
        exponents = [max(keys[n]["exponents"][i] for n in joined) for i in range(len(names))]
        encoding = FixedPoint(bits, len(joined), tuple(exponents), tuple(sizes))
        neighbours = neighbourhoods(joined, self.settings.num_neighbours, self.session)
        thresholds = {n: threshold_of(len(neighbours[n]) + 1, self.settings.threshold) for n in joined}
        share_requests = {
            n: self.request(
                "share-keys", neighbours=[str(m) for m in neighbours[n]],
                **{"encryption-keys": [keys[m]["encryption-key"] for m in neighbours[n]],
                   "mask-keys": [keys[m]["mask-key"] for m in neighbours[n]],
                   "signing-keys": [keys[m]["signing-key"] for m in neighbours[n]],
                   "identity-keys": [keys[m]["identity-key"] for m in neighbours[n]],
                   "identity-signatures": [keys[m]["identity-signature"] for m in neighbours[n]]},
                threshold=thresholds[n], exponents=exponents, clients=len(joined),
            )
            for n in joined
        }

        def check_shares(node: int, content: RecordDict) -> dict[int, bytes]:
            record = content.config_records[RECORD]
            count = len(neighbours[node])
            if field(record, "destinations", str, count) != [str(m) for m in neighbours[node]]:
                raise InvalidReply("shares addressed to other clients than its neighbours")
            return dict(zip(neighbours[node], field(record, "shares", bytes, count)))

        shared = self.exchange("share-keys", share_requests, check_shares)
        sources = {n: [m for m in neighbours[n] if m in shared] for n in shared}
        collect_requests = {
            n: self.request("collect", sources=[str(m) for m in sources[n]], shares=[shared[m][n] for m in sources[n]])
            for n in shared
        }

        def check_vector(node: int, content: RecordDict) -> np.ndarray:
            if VECTOR not in content.array_records or list(content.array_records[VECTOR]) != ["values"]:
                raise InvalidReply("no masked vector")
            vector = content.array_records[VECTOR]["values"].numpy()
            if vector.dtype != encoding.dtype or vector.shape != (encoding.length,):
                raise InvalidReply(f"masked vector of {vector.dtype} {vector.shape}, expected {np.dtype(encoding.dtype)} ({encoding.length},)")
            return vector

        masked = self.exchange("collect", collect_requests, check_vector)
        dropped = sorted(set(shared) - set(masked))
        allowed = self.settings.max_dropouts
        if allowed is not None and len(dropped) > allowed:
            raise TooFewReplies(f"secagg: {len(dropped)} clients dropped out after sharing keys, "
                                f"secagg.max_dropouts={allowed}; stopping (the checkpoint of the last finished round is kept)")
        holders = {n: [m for m in [n, *sources[n]] if m in masked] for n in masked}
        short = [n for n in masked if len(holders[n]) < thresholds[n]]
        if short:
            n = short[0]
            raise TooFewReplies(f"secagg: {len(dropped)} clients dropped out after sharing keys; node {n} has "
                                f"{len(holders[n])} surviving share holders, threshold {thresholds[n]}; stopping "
                                "(the checkpoint of the last finished round is kept)")
        survivors = sorted(masked)
        message = masks.survivors_message(self.session, survivors)

        def check_signature(node: int, content: RecordDict) -> bytes:
            signature = field(content.config_records[RECORD], "signature", bytes)
            if not masks.verifies(keys[node]["signing-key"], message, signature):
                raise InvalidReply("its signature of the survivor set does not verify")
            return signature

        signed = self.exchange("consistency", {n: self.request("consistency", survivors=[str(m) for m in survivors]) for n in masked},
                               check_signature)
        unmask_requests = {
            n: self.request("unmask", signers=[str(m) for m in holders[n] if m in signed],
                            signatures=[signed[m] for m in holders[n] if m in signed])
            for n in signed
        }

        def check_unmask(node: int, content: RecordDict) -> dict[str, dict[int, bytes]]:
            record = content.config_records[RECORD]
            returned = {}
            asked = {"seed": [str(m) for m in holders[node]], "key": [str(m) for m in sources[node] if m not in masked]}
            for kind, owners in asked.items():
                if sorted(field(record, f"{kind}-owners", str, len(owners))) != sorted(owners):
                    raise InvalidReply(f"{kind}-owners differ from those asked for")
                returned[kind] = dict(zip(map(int, record[f"{kind}-owners"]), field(record, f"{kind}-shares", bytes, len(owners))))
            return returned

        unmasked = self.exchange("unmask", unmask_requests, check_unmask)
        seed_shares = {n: [shares["seed"][n] for shares in unmasked.values() if n in shares["seed"]] for n in masked}
        key_shares = {n: [shares["key"][n] for shares in unmasked.values() if n in shares["key"]] for n in dropped}
        try:
            total = unmasked_sum(
                masked, dropped, neighbours, {n: keys[n]["mask-key"] for n in joined},
                {n: keys[n]["seed-commitment"] for n in joined}, thresholds, seed_shares, key_shares, self.session, encoding,
            )
        except SecAggFailed as exc:
            raise TooFewReplies(f"secagg: {exc}; stopping (the checkpoint of the last finished round is kept)") from None
        for node in dropped:
            self.result.failed.setdefault(node, "dropped out of the secure sum after sharing keys")
        self.result.authenticated = sum(1 for n in masked if keys[n]["identity-key"])
        return total, len(masked)


def summed_update(total: np.ndarray, clients: int, expected: Shapes, weighted: bool, packing: Packing = Packing()) -> ClientUpdate:
    """The one update a round's recovered sum stands for: the tensors' sums (or sample-weighted
    means when ``weighted``), the total count and the sample-weighted mean loss.

    The replies' Grams that ``packing`` names were summed packed: the sum of upper triangles is the
    upper triangle of the sum, unpacked here into the square Gram of shape ``expected``."""
    expected = packing.wire_shapes(expected)
    names, sizes = layout_of(expected)
    parts = np.split(total, np.cumsum(sizes)[:-1])
    count = float(parts[-2][0])
    if abs(count - round(count)) > 1e-6 * max(1.0, abs(count)):
        raise InvalidReply(f"the summed num-examples {count!r} is not an integer")
    count = int(round(count))
    if weighted and count <= 0:
        raise InvalidReply(f"the summed num-examples is {count}: no sample-weighted mean")
    scale = 1.0 / count if weighted else 1.0
    tensors = {name: torch.from_numpy(part * scale).reshape(expected[name]) for name, part in zip(names[:-2], parts)}
    loss = float(parts[-1][0]) / count if count else 0.0
    return ClientUpdate(node_id=0, tensors=packing.unpack(tensors), num_examples=count, loss=loss, clients=clients)


def secure_sender(
    post: Post, strategy: FederatedStrategy, settings: SecAggSettings, limits: ReplyLimits, min_replies: int,
    psd_tolerance: float | None = None,
) -> Send:
    """A :data:`~server_app.loop.Send` whose result is the securely summed update of each exchange.

    The sum is checked like one reply, and its Grams as Grams unless ``psd_tolerance`` is None: a sum of
    Grams is a Gram.
    """

    def send(plan: RoundPlan, task: int, round_in_task: int, nodes: list[int]) -> RoundExchange:
        kind = MessageType.EVALUATE if plan.evaluates else MessageType.TRAIN
        weighted = not plan.evaluates and strategy.secure_sum == "mean"
        expected = strategy.expected_reply(plan, task)
        needed = max(2, min(min_replies, len(nodes)))
        secure = SecureRound(post, settings, limits, needed, kind)
        wire = plan.packing.wire_shapes(expected)
        total, clients = secure.run(encode_request(plan, task, round_in_task), nodes, wire, weighted)
        scaled = ReplyLimits(limits.max_examples * clients, limits.max_norm * (1 if weighted else clients))
        try:
            update = checked(summed_update(total, clients, expected, weighted, plan.packing), expected, scaled)
            checks_grams = psd_tolerance is not None and not plan.evaluates
            problem = sanity_problem(update, strategy.weighted_sums(plan), psd_tolerance) if checks_grams else None
            if problem:
                raise InvalidReply(problem)
            secure.result.updates = [update]
        except InvalidReply as exc:
            raise TooFewReplies(f"task {task + 1} round {round_in_task + 1}: the secure sum is invalid ({exc}); "
                                "stopping (the checkpoint of the last finished round is kept)") from None
        return secure.result

    return send
