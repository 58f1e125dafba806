"""What secure aggregation costs a round, at ViT-B/16 scale, against the plain exchange.

    .venv/bin/python -m bench.secagg                 # LoRM B-round and FedAvg-LoRA, 10 and 50 clients
    .venv/bin/python -m bench.secagg --rank 16

For each method, one round's replies (random tensors of the shapes the strategy expects at
ViT-B/16 scale: 48 adapted layers, CIFAR-100's head) are exchanged once plainly and once
through the five stages of secure aggregation, with the real client code answering each
node's requests in this process. Scenarios: 10 clients, 50 clients (every client masks
with every other), 50 clients in a SecAgg+ ring of 10 neighbours (threshold 2/3, the
least a ring allows), the same ring with keys signed by each node's SuperNode key and
checked by its neighbours (:mod:`fedcil.secagg.identity`), and 50 clients of which
2 drop out after sharing keys. Printed and written to ``bench/results/secagg-<time>.json``:

- bytes up and down per client per round: protobuf sizes of every record sent;
- client seconds: the mean over clients of the time spent in the protocol (key agreement,
  shares, encoding, masks, signatures), not counting local training, which is the same either way;
- server seconds: the rest of the round (checks, unmasking, decoding, the merge), without
  the time spent here counting bytes.

The plain exchange's server time is its validation and merge. Clients run one after the
other here; in a federation they run in parallel, so a round's added wall time is about
client seconds plus server seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

from bench import save_result
from bench.lorm_merge import CLASSES, vit_b16_state
from fedcil.config import compose_config
from fedcil.protocol import ClientUpdate, encode_reply, encode_request
from fedcil.secagg.client import respond
from fedcil.secagg.identity import Identity, fresh_federation
from fedcil.secagg.server import SecAggSettings
from fedcil.tasks import split_for
from server_app.federation import RoundExchange
from server_app.secure import secure_sender
from server_app.validation import ReplyLimits, checked
from strategies import build_strategy

LIMITS = ReplyLimits(max_examples=10_000_000, max_norm=1e13)
SCENARIOS = {  # name: (clients, secure-aggregation settings, clients dropping after sharing keys, keys signed)
    "10 clients": (10, SecAggSettings(True), 0, False),
    "50 clients": (50, SecAggSettings(True), 0, False),
    "50, ring of 10": (50, SecAggSettings(True, num_neighbours=10, threshold=2 / 3), 0, False),
    "50, ring of 10, signed keys": (50, SecAggSettings(True, num_neighbours=10, threshold=2 / 3), 0, True),
    "50, 2 drop out": (50, SecAggSettings(True), 2, False),
}


def size(content: RecordDict) -> int:
    return recorddict_to_proto(content).ByteSize()


def random_replies(shapes: dict[str, tuple[int, ...]], clients: int) -> dict[int, RecordDict]:
    """Plain reply records of ``clients`` clients: random float32 tensors of ``shapes``."""
    g = torch.Generator().manual_seed(0)
    return {
        node: encode_reply({k: torch.randn(s, generator=g).abs() for k, s in shapes.items()}, 100 + node, 1.0)
        for node in range(clients)
    }


class TimedClients:
    """The real client protocol answering in memory, timed; ``leaving`` nodes go after sharing keys;
    nodes with ``identities`` sign and check keys."""

    def __init__(self, replies: dict[int, RecordDict], leaving: set[int], identities: dict[int, Identity]) -> None:
        self.replies, self.leaving, self.identities = replies, leaving, identities
        self.states = {node: RecordDict() for node in replies}
        self.seconds = 0.0  # in the client protocol
        self.measuring = 0.0  # in counting bytes (not part of a round)

    def post(self, contents, kind) -> RoundExchange:
        start = time.perf_counter()
        result = RoundExchange(replies=[], bytes_up=0, bytes_down=sum(size(c) for c in contents.values()), sampled=list(contents))
        self.measuring += time.perf_counter() - start
        for node, content in contents.items():
            if node in self.leaving and content.config_records["secagg"]["stage"] in ("collect", "consistency", "unmask"):
                result.failed[node] = "dropped out"
                continue
            start = time.perf_counter()
            reply = respond(content, self.states[node], node, lambda _, n=node: self.replies[n], self.identities.get(node))
            self.seconds += time.perf_counter() - start
            start = time.perf_counter()
            result.bytes_up += size(reply)
            self.measuring += time.perf_counter() - start
            result.replies.append((node, reply))
        return result


def measure_method(method: str, rank: int) -> dict:
    """Plain and secure figures of one round of ``method`` in every scenario."""
    cfg = compose_config("config", ["experiment=lorm_cifar100", f"method={method}", f"lora.rank={rank}"])
    state = vit_b16_state(rank)
    strategy = build_strategy(cfg, split_for(cfg, CLASSES), state)
    strategy.start_task(0)
    plan = strategy.configure_round(0, 0)
    shapes = strategy.expected_reply(plan, 0)
    request = size(encode_request(plan, 0, 0))
    figures = {"entries": sum(int(np.prod(s)) for s in shapes.values())}
    for name, (clients, settings, dropping, signed) in SCENARIOS.items():
        replies = random_replies(shapes, clients)
        start = time.perf_counter()
        updates = [checked(ClientUpdate(n, r.array_records["update"].to_torch_state_dict(), 100 + n, 1.0), shapes, LIMITS)
                   for n, r in replies.items()]
        strategy.aggregate_round(0, 0, updates)
        plain_server = time.perf_counter() - start
        people = TimedClients(replies, set(range(dropping)), fresh_federation(replies) if signed else {})
        start = time.perf_counter()
        result = secure_sender(people.post, strategy, settings, LIMITS, 1)(plan, 0, 0, sorted(replies))
        strategy.aggregate_round(0, 0, result.updates)
        total = time.perf_counter() - start
        figures[name] = {
            "clients": clients,
            "plain": {"bytes_up": size(replies[0]), "bytes_down": request, "server_s": plain_server},
            "secure": {
                "bytes_up": result.bytes_up // clients, "bytes_down": result.bytes_down // clients,
                "client_s": people.seconds / clients, "server_s": total - people.seconds - people.measuring,
            },
        }
        print(f"  {method}, {name}: done in {total:.1f} s", flush=True)
    return figures


def report(result: dict) -> None:
    print(f"\nViT-B/16 shapes, r = {result['rank']}; per client and round; secure with 64-bit entries")
    header = f"{'':<30}{'up plain':>12}{'up secure':>12}{'ratio':>7}{'down plain':>12}{'down secure':>12}{'client s':>10}{'server s':>10}{'plain s':>9}"
    for method in ("lorm", "fedavg_lora"):
        figures = result[method]
        print(f"\n{method} ({figures['entries']:,} entries a reply)\n{header}")
        for name in SCENARIOS:
            p, s = figures[name]["plain"], figures[name]["secure"]
            print(f"{name:<30}{p['bytes_up']:>12,}{s['bytes_up']:>12,}{s['bytes_up'] / p['bytes_up']:>7.2f}"
                  f"{p['bytes_down']:>12,}{s['bytes_down']:>12,}{s['client_s']:>10.2f}{s['server_s']:>10.2f}{p['server_s']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    result = {"rank": args.rank, "threads": torch.get_num_threads()}
    for method in ("lorm", "fedavg_lora"):
        result[method] = measure_method(method, args.rank)
    report(result)
    save_result("secagg", result)


if __name__ == "__main__":
    main()
