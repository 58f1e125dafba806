"""A client's side of a secure-aggregation round: five stages, each a request and a reply.

1. ``setup``: the request is an ordinary round request; the client answers it (trains),
   keeps its reply as a vector, and sends only three fresh public keys (to encrypt shares,
   to agree on masks, to verify its signatures), a commitment to a fresh self-mask seed,
   its reply's layout and the range exponent of each segment; with an :class:`Identity`,
   the three keys signed with its SuperNode key (:mod:`fedcil.secagg.identity`).
2. ``share-keys``: given its neighbours' public keys, it Shamir-shares its seed and its
   mask private key (its secret scalar) among itself and its neighbours, and sends each share encrypted for
   its holder; with an :class:`Identity`, only once every neighbour's keys are signed, for this
   round and that neighbour, by a distinct trusted key other than its own.
3. ``collect``: given the shares its neighbours sent it, it sends its encoded vector plus
   the self-mask and one pairwise mask per neighbour that shared keys.
4. ``consistency``: given the set of clients that sent a vector (the survivors), it signs
   that set, once per round.
5. ``unmask``: given its share holders' signatures, it checks that at least ``t`` of them
   (itself included) signed the set it signed, then sends the seed shares of its surviving
   neighbours and itself and the mask-key shares of the neighbours missing from the set:
   never both for one client, and only as that one set says.

State between stages lives in a :class:`~flwr.app.RecordDict` (Flower's ``context.state``);
a request for a stage out of order, for another round, or that would reveal both secrets
of a client raises :class:`ProtocolError`, and so does a second setup for an exchange
(task, round and kind) already set up in this run: a server re-running one exchange over
two sets of clients could subtract the sums.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedcil.secagg import masks
from fedcil.secagg.encoding import FixedPoint, range_exponent
from fedcil.secagg.identity import SIGNED_KEYS, Identity, sign_keys, signed_by

RECORD = "secagg"  # the ConfigRecord of every secure-aggregation request and reply
VECTOR = "secagg-vector"  # the ArrayRecord a client keeps its vector in, and sends it masked in
SET_UP = "secagg-set-up"  # the ConfigRecord of the exchanges this client has set up in this run
STAGES = ("setup", "share-keys", "collect", "consistency", "unmask")
COUNT, LOSS = "#num-examples", "#loss-sum"  # the last two segments of every vector


class ProtocolError(ValueError):
    """A secure-aggregation message that must not be acted on; the message says why."""


def reply_vector(content: RecordDict, weighted: bool) -> tuple[list[str], list[int], np.ndarray]:
    """The layout (names, sizes) and float64 vector of a plain reply's records.

    The tensors in name order (times ``num-examples`` when ``weighted``), then the count
    and ``num-examples * train-loss``.
    """
    tensors = {name: array.numpy().astype(np.float64).ravel() for name, array in content.array_records["update"].items()}
    metrics = content.metric_records["metrics"]
    count, loss = float(metrics["num-examples"]), float(metrics["train-loss"])
    names = sorted(tensors)
    parts = [tensors[name] * count if weighted else tensors[name] for name in names]
    parts += [np.array([count]), np.array([count * loss])]
    return [*names, COUNT, LOSS], [part.size for part in parts], np.concatenate(parts)


def pairwise_sign(node: int, other: int) -> int:
    """+1 or -1: the sign ``node`` gives its mask shared with ``other`` (the two cancel in a sum)."""
    return 1 if node > other else -1


def _state(state: RecordDict, request: ConfigRecord, stage: str) -> ConfigRecord:
    """The client's record for this request's round, which must be at the stage before ``stage``."""
    if RECORD not in state.config_records:
        raise ProtocolError(f"secagg stage {stage!r} without a round in progress")
    record = state.config_records[RECORD]
    before = STAGES[STAGES.index(stage) - 1]
    if record["session"] != request["session"]:
        raise ProtocolError(f"secagg stage {stage!r} for another round")
    if record["stage"] != before:
        raise ProtocolError(f"secagg stage {stage!r} after {record['stage']!r}; expected after {before!r}")
    return record


def _reply(request: ConfigRecord, **fields: object) -> ConfigRecord:
    return ConfigRecord({"stage": request["stage"], "session": request["session"], **fields})  # type: ignore[arg-type]


def exchange_of(content: RecordDict) -> str:
    """What a round request is for: ``task/round/kind``, kind ``train``, ``evaluate`` or ``statistics:<name>``."""
    config = content.config_records.get("config")
    if config is None or "task" not in config or "round" not in config:
        raise ProtocolError("secagg setup without a round request (task and round)")
    statistics = str(config.get("statistics", "none"))
    kind = "evaluate" if config.get("evaluate") else "train" if statistics == "none" else f"statistics:{statistics}"
    return f"{int(config['task'])}/{int(config['round'])}/{kind}"


def request_digest(content: RecordDict) -> str:
    """SHA-256 of what a round request asks a client to compute on: every array and every config entry but the round."""
    digest = hashlib.sha256()
    for name in sorted(content.array_records):
        for key, array in sorted(content.array_records[name].items()):
            digest.update(f"{name}/{key}/{array.dtype}/{array.shape}".encode())
            digest.update(array.data)
    config = {k: v for k, v in content.config_records["config"].items() if k != "round"}
    digest.update(repr(sorted(config.items())).encode())
    return digest.hexdigest()


def claim_exchange(content: RecordDict, state: RecordDict) -> None:
    """Record that this client sets up ``content``'s exchange; refuse one it has set up before, and the same
    request again under another round number (the same reply, summed over other clients)."""
    exchange, digest = exchange_of(content), request_digest(content)
    done = state.config_records.setdefault(SET_UP, ConfigRecord({"exchanges": [], "digests": []}))
    if exchange in done["exchanges"]:
        raise ProtocolError(f"secagg setup for exchange {exchange} (task/round/kind), which this client has set up "
                            "before; a second sum over other clients would reveal the difference")
    if digest in done["digests"]:
        raise ProtocolError(f"secagg setup for exchange {exchange} repeats the request of an exchange this client has "
                            "set up before; a second sum over other clients would reveal the difference")
    done["exchanges"] = [*done["exchanges"], exchange]
    done["digests"] = [*done["digests"], digest]


def setup(request: ConfigRecord, answer: RecordDict, node: int, state: RecordDict, identity: Identity | None = None) -> RecordDict:
    """Stage 1: keep the plain reply ``answer`` as a vector; send keys (signed with ``identity``'s
    key when given), commitment, layout, ranges."""
    names, sizes, vector = reply_vector(answer, bool(request["weighted"]))
    encryption_private, encryption_public = masks.new_key_pair()
    mask_private, mask_public = masks.new_key_pair()
    signing_private, signing_public = masks.new_key_pair()
    seed = masks.new_seed()
    bounds = np.cumsum([0, *sizes])
    exponents = [range_exponent(vector[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]
    state.config_records[RECORD] = ConfigRecord({
        "stage": "setup", "session": request["session"], "node": str(node), "bits": int(request["bits"]),
        "encryption-private": encryption_private, "mask-private": mask_private, "signing-private": signing_private,
        "seed": seed, "exponents": exponents,
        "sizes": sizes,
    })
    state.array_records[VECTOR] = ArrayRecord({"values": Array(vector)})
    keys = {"encryption-key": encryption_public, "mask-key": mask_public, "signing-key": signing_public}
    if identity is not None:
        keys |= {"identity-key": identity.public, "identity-signature": sign_keys(identity, request["session"], node, keys)}
    return RecordDict({RECORD: _reply(
        request, **keys, **{"seed-commitment": masks.commitment(seed), "names": names, "sizes": sizes, "exponents": exponents},
    )})


def check_neighbour_keys(request: ConfigRecord, neighbours: list[int], identity: Identity) -> None:
    """Refuse unless each neighbour's keys are signed, for this round and that neighbour, by a distinct trusted key
    other than this node's own: keys the server made up or swapped, or one node's keys under two ids, fail."""
    public, signatures = request.get("identity-keys"), request.get("identity-signatures")
    if not isinstance(public, list) or not isinstance(signatures, list) or not len(public) == len(signatures) == len(neighbours):
        raise ProtocolError("secagg neighbours' keys come without their SuperNode keys' signatures, which this node "
                            "requires (FEDCIL_SECAGG_TRUSTED_KEYS)")
    seen = {identity.public}
    for index, neighbour in enumerate(neighbours):
        keys = {name: request[f"{name}s"][index] for name in SIGNED_KEYS}
        key = public[index]
        if key not in identity.trusted or key in seen:
            raise ProtocolError(f"secagg neighbour {neighbour}'s keys are signed by "
                                f"{'no registered SuperNode key' if key not in identity.trusted else 'a key already used'}")
        if not signed_by(key, signatures[index], request["session"], neighbour, keys):
            raise ProtocolError(f"secagg neighbour {neighbour}'s keys do not verify against its SuperNode key "
                                "for this round and node id")
        seen.add(key)


def share_keys(request: ConfigRecord, state: RecordDict, identity: Identity | None = None) -> RecordDict:
    """Stage 2: Shamir-share the seed and the mask private key among the neighbours and this client
    (with ``identity``, after :func:`check_neighbour_keys`)."""
    record = _state(state, request, "share-keys")
    node = int(record["node"])
    neighbours = [int(n) for n in request["neighbours"]]
    threshold, holders = int(request["threshold"]), len(neighbours) + 1
    if node in neighbours or len(set(neighbours)) != len(neighbours):
        raise ProtocolError("secagg neighbours repeat a node or include this client")
    if not (holders + 1) / 2 < threshold <= holders:
        raise ProtocolError(f"secagg threshold {threshold} for {holders} share holders; allowed: more than (holders + 1) / 2, "
                            "at most all")
    if any(len(request[f"{kind}s"]) != len(neighbours) for kind in SIGNED_KEYS):
        raise ProtocolError("secagg keys are not one per neighbour")
    if identity is not None:
        check_neighbour_keys(request, neighbours, identity)
    exponents = [int(e) for e in request["exponents"]]
    if len(exponents) != len(record["exponents"]) or any(e < own for e, own in zip(exponents, record["exponents"])):
        raise ProtocolError("secagg exponents do not cover this client's ranges")
    seed_shares = masks.split_secret(record["seed"], threshold, holders)
    key_shares = masks.split_secret(masks.private_scalar(record["mask-private"]), threshold, holders)
    ciphertexts = []
    for index, (other, public) in enumerate(zip(neighbours, request["encryption-keys"], strict=True)):
        key = masks.shared_secret(record["encryption-private"], public)
        ciphertexts.append(masks.seal_shares(key, node, other, seed_shares[index], key_shares[index]))
    record.update({
        "stage": "share-keys", "neighbours": [str(n) for n in neighbours], "encryption-keys": list(request["encryption-keys"]),
        "mask-keys": list(request["mask-keys"]), "signing-keys": list(request["signing-keys"]), "threshold": threshold,
        "exponents": exponents,
        "clients": int(request["clients"]), "own-seed-share": seed_shares[-1], "own-key-share": key_shares[-1],
    })
    return RecordDict({RECORD: _reply(request, destinations=[str(n) for n in neighbours], shares=ciphertexts)})


def collect(request: ConfigRecord, state: RecordDict) -> RecordDict:
    """Stage 3: keep the shares sent to this client; send the masked, encoded vector."""
    record = _state(state, request, "collect")
    node, bits = int(record["node"]), int(record["bits"])
    neighbours = [int(n) for n in record["neighbours"]]
    sources = [int(n) for n in request["sources"]]
    if not set(sources) <= set(neighbours) or len(set(sources)) != len(sources):
        raise ProtocolError("secagg shares from clients that are not this client's neighbours")
    if len(sources) + 1 < int(record["threshold"]):
        raise ProtocolError(f"secagg: {len(sources)} neighbours shared keys, fewer than the threshold needs")
    kept = []
    for source, ciphertext in zip(sources, request["shares"], strict=True):
        public = record["encryption-keys"][neighbours.index(source)]
        try:
            src, dst, seed_share, key_share = masks.open_shares(masks.shared_secret(record["encryption-private"], public), ciphertext)
        except Exception as exc:  # tampered, truncated or foreign ciphertext
            raise ProtocolError(f"secagg share from {source} does not decrypt: {type(exc).__name__}") from None
        if (src, dst) != (source, node):
            raise ProtocolError(f"secagg share from {source} is addressed from {src} to {dst}")
        kept += [seed_share, key_share]
    values = state.array_records[VECTOR]["values"].numpy()
    exponents = tuple(int(e) for e in record["exponents"])
    layout = FixedPoint(bits, int(record["clients"]), exponents, tuple(int(n) for n in record["sizes"]))
    masked = layout.encode(values) + masks.mask(record["seed"], record["session"], layout.length, bits)
    for source in sources:
        secret = masks.shared_secret(record["mask-private"], record["mask-keys"][neighbours.index(source)])
        pairwise = masks.mask(secret, record["session"], layout.length, bits)
        masked = masked + pairwise if pairwise_sign(node, source) > 0 else masked - pairwise
    record.update({"stage": "collect", "sources": [str(s) for s in sources], "held": kept})
    del state.array_records[VECTOR]
    return RecordDict({RECORD: _reply(request), VECTOR: ArrayRecord({"values": Array(masked)})})


def consistency(request: ConfigRecord, state: RecordDict) -> RecordDict:
    """Stage 4: sign the survivor set the server sends (this client must be in it)."""
    record = _state(state, request, "consistency")
    node = int(record["node"])
    survivors = sorted({int(n) for n in request["survivors"]})
    if node not in survivors or len(survivors) != len(request["survivors"]):
        raise ProtocolError("secagg survivor set without this client, or with a client twice")
    record.update({"stage": "consistency", "survivors": [str(n) for n in survivors]})
    signature = masks.sign(record["signing-private"], masks.survivors_message(record["session"], survivors))
    return RecordDict({RECORD: _reply(request, signature=signature)})


def unmask(request: ConfigRecord, state: RecordDict) -> RecordDict:
    """Stage 5: once ``t`` share holders signed this client's survivor set, seed shares of the
    survivors among them and key shares of the neighbours missing from the set."""
    record = _state(state, request, "unmask")
    node, threshold = int(record["node"]), int(record["threshold"])
    survivors = [int(n) for n in record["survivors"]]
    neighbours, sources = [int(n) for n in record["neighbours"]], [int(n) for n in record["sources"]]
    holders = {node, *(set(sources) & set(survivors))}
    message = masks.survivors_message(record["session"], survivors)
    signers, signatures = [int(n) for n in request["signers"]], list(request["signatures"])
    if len(signers) != len(signatures):
        raise ProtocolError("secagg: signers and signatures differ in number")
    signed = {node} | {
        signer for signer, signature in zip(signers, signatures)
        if signer in holders - {node} and masks.verifies(record["signing-keys"][neighbours.index(signer)], message, signature)
    }
    if len(signed) < threshold:
        raise ProtocolError(f"secagg: {len(signed)} of this client's share holders signed the survivor set it signed, "
                            f"fewer than the threshold {threshold} (a server telling clients different sets could learn a vector)")
    held = {int(s): (record["held"][2 * i], record["held"][2 * i + 1]) for i, s in enumerate(record["sources"])}
    held[node] = (record["own-seed-share"], record["own-key-share"])
    del state.config_records[RECORD]  # one unmasking per round: a replay finds no round in progress
    seed_owners, key_owners = sorted(holders), sorted(set(sources) - set(survivors))
    return RecordDict({RECORD: _reply(
        request, **{"seed-owners": [str(n) for n in seed_owners], "seed-shares": [held[n][0] for n in seed_owners],
                    "key-owners": [str(n) for n in key_owners], "key-shares": [held[n][1] for n in key_owners]},
    )})


def respond(content: RecordDict, state: RecordDict, node: int, answer: Callable[[RecordDict], RecordDict],
            identity: Identity | None = None) -> RecordDict:
    """A client's reply to a request: the plain ``answer`` unless the request is a secure-aggregation stage
    (whose keys are signed and checked with ``identity`` when given)."""
    if RECORD not in content.config_records:
        return answer(content)
    request = content.config_records[RECORD]
    stage = request.get("stage")
    if stage == "setup":
        claim_exchange(content, state)
        return setup(request, answer(content), node, state, identity)
    if stage == "share-keys":
        return share_keys(request, state, identity)
    if stage == "collect":
        return collect(request, state)
    if stage == "consistency":
        return consistency(request, state)
    if stage == "unmask":
        return unmask(request, state)
    raise ProtocolError(f"unknown secagg stage {stage!r}; valid choices: {', '.join(STAGES)}")
