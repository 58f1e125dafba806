"""The server's side of secure aggregation, as pure functions: who shares with whom, how many
shares rebuild a secret, and how the masks come off the sum."""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcil.secagg import masks
from fedcil.secagg.client import pairwise_sign
from fedcil.secagg.encoding import MIN_EXPONENT, MODULUS_BITS, FixedPoint

MAX_COMBINATIONS = 64  # subsets of shares tried before a secret is declared unrecoverable


class SecAggFailed(RuntimeError):
    """A round whose sum cannot be recovered (too few clients or shares); the message says why."""


@dataclass(frozen=True)
class SecAggSettings:
    """``secagg`` in the config.

    Parameters
    ----------
    enabled : run every exchange of the run through secure aggregation.
    num_neighbours : share keys and masks with this many other clients (an even number: a
        ring, SecAgg+); None: with every other client of the round (SecAgg).
    threshold : share of a client's share holders (its neighbours and itself) whose shares
        rebuild its secrets; above one half, so that no set of replies yields both (and
        :func:`threshold_of` needs more than ``(holders + 1) / 2`` of them).
    max_dropouts : most clients that may drop out of a round after sharing keys (None: as
        many as the threshold allows); a round with more stops the run.
    modulus_bits : 32 or 64: the size of every encoded entry (precision against bytes).
    exponent_slack : a client whose range exponent for a tensor is more than this many bits
        above the round's median for that tensor is left out of the sum (it would coarsen
        everyone's encoding, down to zero).
    """

    enabled: bool = False
    num_neighbours: int | None = None
    threshold: float = 0.6
    max_dropouts: int | None = None
    modulus_bits: int = 64
    exponent_slack: int = 12

    @classmethod
    def from_config(cls, secagg: Mapping[str, Any]) -> SecAggSettings:
        neighbours, dropouts = secagg["num_neighbours"], secagg["max_dropouts"]
        return cls(
            bool(secagg["enabled"]), None if neighbours is None else int(neighbours), float(secagg["threshold"]),
            None if dropouts is None else int(dropouts), int(secagg["modulus_bits"]), int(secagg["exponent_slack"]),
        )

    def __post_init__(self) -> None:
        if self.modulus_bits not in MODULUS_BITS:
            raise ValueError(f"secagg.modulus_bits={self.modulus_bits!r}; valid choices: 32, 64")


def outlying_exponents(exponents: Mapping[int, Sequence[int]], slack: int) -> dict[int, tuple[int, int, int]]:
    """Per node with a segment whose range exponent is more than ``slack`` above that segment's
    median: ``(segment, exponent, median)`` of its first such segment.

    The median (the lower one) is over the nodes whose segment is not all zero
    (``MIN_EXPONENT``), so that a tensor most clients leave at zero does not drop the others.
    """
    medians = []
    for segment in range(len(next(iter(exponents.values()), []))):
        nonzero = [e[segment] for e in exponents.values() if e[segment] > MIN_EXPONENT]
        medians.append(statistics.median_low(nonzero) if nonzero else MIN_EXPONENT)
    outliers = {}
    for node, own in exponents.items():
        above = [i for i, (e, median) in enumerate(zip(own, medians)) if e > median + slack]
        if above:
            outliers[node] = (above[0], own[above[0]], medians[above[0]])
    return outliers


def neighbourhoods(nodes: Sequence[int], degree: int | None, session: bytes) -> dict[int, list[int]]:
    """Each node's neighbours: all others, or ``degree // 2`` on each side in a ring shuffled by ``session``.

    The graph is symmetric: ``j`` is a neighbour of ``k`` exactly when ``k`` is one of ``j``.
    """
    order = sorted(nodes, key=lambda n: hashlib.sha256(session + str(n).encode()).digest())
    if degree is None or degree >= len(order) - 1:
        return {n: [m for m in order if m != n] for n in order}
    half, size = degree // 2, len(order)
    return {
        node: [order[(i + step) % size] for step in range(-half, half + 1) if step != 0]
        for i, node in enumerate(order)
    }


def threshold_of(holders: int, share: float) -> int:
    """Shares needed to rebuild a secret split among ``holders``: ``ceil(share * holders)``, and more
    than ``(holders + 1) / 2``: below that, a server could tell one set of ``t`` holders that a client
    survived and get its seed, and tell it that its other neighbours did not share keys."""
    return min(holders, max((holders + 1) // 2 + 1, math.ceil(share * holders)))


def _blocks(count: int, threshold: int, left_out: int) -> list[range]:
    """``count`` share positions cut into blocks so small that leaving out any ``left_out`` of them keeps ``threshold``."""
    size = (count - threshold) // left_out
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def tolerated_tampering(count: int, threshold: int) -> int:
    """The most tampered shares among ``count`` that :func:`rebuild_checked` always outvotes.

    It tries every way to leave out ``e`` blocks for ``e = 1, 2, ...`` while the subsets
    tried stay within :data:`MAX_COMBINATIONS`; one of those leaves out every tampered share.
    """
    tried, tolerated = 1, 0
    while tolerated < count - threshold:
        more = math.comb(len(_blocks(count, threshold, tolerated + 1)), tolerated + 1)
        if tried + more > MAX_COMBINATIONS:
            break
        tried, tolerated = tried + more, tolerated + 1
    return tolerated


def share_subsets(count: int, threshold: int) -> Iterator[list[int]]:
    """Positions of shares to rebuild a secret from: the first ``threshold``, then all but ``e``
    blocks, for every choice of blocks, ``e`` from 1 to :func:`tolerated_tampering`."""
    yield list(range(threshold))
    for left_out in range(1, tolerated_tampering(count, threshold) + 1):
        for blocks in itertools.combinations(_blocks(count, threshold, left_out), left_out):
            out = set().union(*blocks)
            yield [i for i in range(count) if i not in out]


def rebuild_checked(shares: Sequence[bytes], threshold: int, valid: Callable[[bytes], bool], owner: int) -> bytes:
    """The secret that at least ``threshold`` of ``shares`` rebuild and ``valid`` accepts.

    Up to :func:`tolerated_tampering` tampered shares, wherever they are, are outvoted:
    Shamir's interpolation through more than ``threshold`` consistent shares gives the same
    secret, so each subset of :func:`share_subsets` that holds no tampered share rebuilds it.
    """
    if len(shares) < threshold:
        raise SecAggFailed(f"node {owner}: {len(shares)} shares of its secret came back, {threshold} needed")
    for subset in share_subsets(len(shares), threshold):
        try:
            secret = masks.rebuild_secret([shares[i] for i in subset])
            if valid(secret):
                return secret
        except Exception:  # a tampered share makes garbage or a padding error
            continue
    raise SecAggFailed(f"node {owner}: no {threshold} of its {len(shares)} shares rebuild its committed secret")


def _valid_scalar(public: bytes) -> Callable[[bytes], bool]:
    """Whether a rebuilt secret scalar is the private key of ``public``."""

    def valid(scalar: bytes) -> bool:
        try:
            return masks.public_of(masks.private_from_scalar(scalar)) == public
        except Exception:  # not a scalar of the curve
            return False

    return valid


def unmasked_sum(
    masked: Mapping[int, np.ndarray], dropped: Sequence[int], neighbours: Mapping[int, Sequence[int]],
    mask_keys: Mapping[int, bytes], commitments: Mapping[int, bytes], thresholds: Mapping[int, int],
    seed_shares: Mapping[int, Sequence[bytes]], key_shares: Mapping[int, Sequence[bytes]],
    session: bytes, encoding: FixedPoint,
) -> np.ndarray:
    """The float64 sum of the survivors' vectors (the keys of ``masked``).

    Adds the masked vectors up modulo ``2**bits``, removes each survivor's self-mask (its
    seed rebuilt from shares and checked against its commitment) and the pairwise masks
    survivors shared with ``dropped`` clients (their mask keys rebuilt and checked against
    their public keys), and decodes.
    """
    total = np.zeros(encoding.length, dtype=encoding.dtype)
    for vector in masked.values():
        total += vector
    for node in masked:
        seed = rebuild_checked(seed_shares.get(node, []), thresholds[node], lambda s, c=commitments[node]: masks.commitment(s) == c, node)
        total -= masks.mask(seed, session, encoding.length, encoding.bits)
    for node in dropped:
        scalar = rebuild_checked(key_shares.get(node, []), thresholds[node], _valid_scalar(mask_keys[node]), node)
        private = masks.private_from_scalar(scalar)
        for survivor in neighbours[node]:
            if survivor in masked:
                pairwise = masks.mask(masks.shared_secret(private, mask_keys[survivor]), session, encoding.length, encoding.bits)
                total = total - pairwise if pairwise_sign(survivor, node) > 0 else total + pairwise
    return encoding.decode(total)
