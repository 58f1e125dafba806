"""Federated runs without Flower's runtime: every client is a function call.

``backend=inprocess`` runs the ServerApp's task/round loop (:func:`server_app.loop.run_rounds`)
with the same strategies and the same client code, and passes every request and reply
through the same records a Flower run sends; bytes are the protobuf sizes of those
records (a Flower message adds about a hundred bytes of metadata). There is no SuperLink
and no Ray: one process, which is the quickest way to use a single GPU and the easiest to
debug. An ``executor`` (a process pool) trains the sampled clients side by side, as Ray
actors do. A client that raises stops the run (its last checkpoint is kept).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto
from omegaconf import DictConfig

from client_app.local_round import answer_request
from fedcil.secagg.client import respond
from server_app.federation import Post, RoundExchange
from server_app.loop import run_rounds


def records_bytes(content: RecordDict) -> int:
    """Size of a message's records as serialised on the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


@contextmanager
def client_threads(cfg: DictConfig) -> Iterator[None]:
    """Torch uses ``client_resources.num_cpus`` threads inside, as a Flower client does.

    Floating-point reductions depend on the thread count, so this is what makes a run
    bit-identical under both backends (and a resumed run equal to an uninterrupted one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.client_resources.num_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pooled_answer(cfg: DictConfig, content: RecordDict, partition_id: int) -> RecordDict:
    """:func:`answer_request` in a pool worker, with the client's thread count."""
    with client_threads(cfg):
        return answer_request(cfg, content, partition_id, cfg.num_clients)


def inprocess_post(cfg: DictConfig, executor: Executor | None = None) -> Post:
    """A :data:`server_app.federation.Post` whose node ``k`` is partition ``k``, trained here or in ``executor``.

    Each node keeps its state between messages, as a SuperNode's ``context.state`` does
    (secure aggregation's stages need it).
    """
    states: dict[int, RecordDict] = {}

    def plain(content: RecordDict, node: int) -> RecordDict:
        if executor is None:
            return answer_request(cfg, content, node, cfg.num_clients)
        return executor.submit(pooled_answer, cfg, content, node).result()

    def client(node: int, content: RecordDict) -> RecordDict:
        return respond(content, states.setdefault(node, RecordDict()), node, lambda request: plain(request, node))

    def post(contents: Mapping[int, RecordDict], kind: str) -> RoundExchange:
        nodes = list(contents)
        if executor is None:
            with client_threads(cfg):
                replies = [client(node, contents[node]) for node in nodes]
        else:
            with ThreadPoolExecutor(max(1, len(nodes))) as threads:
                replies = list(threads.map(client, nodes, [contents[node] for node in nodes]))
        return RoundExchange(
            replies=list(zip(nodes, replies)),
            bytes_up=sum(records_bytes(r) for r in replies),
            bytes_down=sum(records_bytes(c) for c in contents.values()),
            sampled=nodes,
        )

    return post


def run_inprocess(cfg: DictConfig, executor: Executor | None = None) -> dict:
    """Run ``cfg`` with ``num_clients`` in-process clients; write and return the results."""
    started = time.monotonic()
    return run_rounds(inprocess_post(cfg, executor), list(range(cfg.num_clients)), cfg, started)
