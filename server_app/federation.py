"""The Flower-facing part of a round: find nodes, sample, send, receive, measure bytes."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate, RoundPlan

if TYPE_CHECKING:
    from server_app.influence import DirectionRatio


@dataclass
class RoundExchange:
    """The outcome of one round's message exchange.

    ``replies`` are the records as received; ``updates`` the valid ones, decoded, once
    :func:`server_app.loop.screened` has checked them. ``failed`` says why each node that
    was asked has no update, ``capped`` whose weight the influence bounds cut, and
    ``direction_ratio`` the largest direction ratio of the replies' Grams (with
    ``replies.direction_factor`` set); under secure aggregation, ``authenticated`` counts the
    clients in the sum whose keys came signed with their SuperNode keys (:mod:`fedcil.secagg.identity`).
    """

    replies: list[tuple[int, RecordDict]]
    bytes_up: int
    bytes_down: int
    sampled: list[int]
    failed: dict[int, str] = field(default_factory=dict)
    updates: list[ClientUpdate] = field(default_factory=list)
    capped: dict[int, str] = field(default_factory=dict)
    direction_ratio: DirectionRatio | None = None
    authenticated: int | None = None


Post = Callable[[Mapping[int, RecordDict], str], RoundExchange]
"""Deliver each node (the keys) its request, all of one message type; the replies as received."""


Send = Callable[[RoundPlan, int, int, list[int]], RoundExchange]
"""Deliver a plan for (task, round) to nodes; the exchange with the replies as received (or,
under secure aggregation, with their sum as its one update)."""


def flower_post(grid: Grid, timeout: float | None) -> Post:
    """A :data:`Post` over Flower messages on ``grid``."""
    return lambda contents, kind: exchange(grid, contents, timeout, kind)


def message_bytes(message: Message) -> int:
    """Size of a message as serialised on the wire (protobuf)."""
    return message_to_proto(message).ByteSize()


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` SuperNodes are connected; a clear error otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) > expected or (len(nodes) < expected and time.monotonic() > deadline):
            raise ConfigError(
                f"config num_clients={expected} but the federation has {len(nodes)} SuperNodes; "
                f"run with --federation-config 'num-supernodes={expected}' or set num_clients={len(nodes)}"
            )
        if len(nodes) == expected:
            return nodes
        time.sleep(0.5)


def wait_for_federation(grid: Grid, timeout: float, settle: float = 2.0) -> list[int]:
    """Node ids once at least one SuperNode is connected and the count has not changed for ``settle`` seconds.

    Stops waiting after ``timeout`` seconds with the nodes connected then; none is a clear error.
    """
    deadline = time.monotonic() + timeout
    nodes, since = sorted(grid.get_node_ids()), time.monotonic()
    while not (nodes and time.monotonic() - since >= settle) and time.monotonic() < deadline:
        time.sleep(0.25)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, since = now, time.monotonic()
    if not nodes:
        raise ConfigError(f"no SuperNode connected within node_wait_seconds={timeout:g}")
    return nodes


def sample_size(fraction: float, population: int) -> int:
    """How many of ``population`` nodes a round samples: ``max(1, round(fraction * population))``."""
    return max(1, int(round(fraction * population)))


def sample_nodes(node_ids: Sequence[int], fraction: float, rng: np.random.Generator | None) -> list[int]:
    """:func:`sample_size` distinct nodes, drawn without replacement, in sorted order.

    From ``rng`` (seeded: the run can be replayed), or with ``None`` from the operating
    system's CSPRNG (``secrets.SystemRandom``): a secret sample, as ``dp.secret_sampling`` needs.
    """
    size = sample_size(fraction, len(node_ids))
    if rng is None:
        return sorted(secrets.SystemRandom().sample(list(node_ids), size))
    picks = rng.choice(len(node_ids), size=size, replace=False)  # positions: ids are uint64
    return sorted(node_ids[int(i)] for i in picks)


PULL_INTERVAL = 0.1
"""Seconds between two pulls of the replies still awaited (Flower's own ``send_and_receive``
waits 3 s between pulls in a deployment)."""


def push_and_pull(
    grid: Grid, messages: list[Message], timeout: float | None, interval: float = PULL_INTERVAL
) -> list[Message]:
    """Push ``messages``, then pull their replies every ``interval`` seconds until all have come
    or ``timeout`` seconds have passed (``None``: no limit); the replies received."""
    awaited = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while awaited:
        pulled = list(grid.pull_messages(awaited))
        replies.extend(pulled)
        awaited.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not awaited or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
    return replies


def exchange(grid: Grid, contents: Mapping[int, RecordDict], timeout: float | None, kind: str = MessageType.TRAIN) -> RoundExchange:
    """Send each node its request (``kind`` messages: train or evaluate) and collect the replies."""
    node_ids = list(contents)
    messages = [Message(content=contents[n], message_type=kind, dst_node_id=n) for n in node_ids]
    result = RoundExchange(replies=[], bytes_up=0, bytes_down=sum(message_bytes(m) for m in messages), sampled=node_ids)
    replied = set()
    replies = push_and_pull(grid, messages, timeout)
    # Pushing gave each message its id; an error the SuperLink answers for a lost node
    # ("Node Unavailable") comes from the SuperLink, so replies are matched by that id.
    sent_to = {m.metadata.message_id: n for m, n in zip(messages, node_ids)}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        replied.add(node)
        if reply.has_error():
            result.failed[node] = f"client error: {reply.error.reason}"
            continue
        result.bytes_up += message_bytes(reply)
        result.replies.append((node, reply.content))
    for node in node_ids:
        if node not in replied:
            result.failed[node] = "no reply before the round timeout"
    for node, reason in result.failed.items():
        log(WARNING, "node %s left out of the round: %s", node, reason)
    return result
