"""LoRM's server merge time and upload size at ViT-B/16 scale, measured side by side.

    .venv/bin/python -m bench.lorm_merge            # r = 16, 10 clients
    .venv/bin/python -m bench.lorm_merge --rank 1

1. Merge time: the server's ``aggregate_round`` (sum the 10 clients' summaries, solve every
   one of the 48 adapted layers (qkv, proj, fc1, fc2 of 12 blocks) and the head rows of a
   CIFAR-100 task) for an A-round and a B-round, with diagonal Grams (``gram_alpha = 0``,
   the paper's backbone setting) and dense ones (``gram_alpha = 1``); and the end-of-task
   cross-task merge of the evaluated model. Median of ``--repeats`` runs on this CPU. Next
   to each round's merge, one run of the influence bounds on the same replies (the Gram
   checks and the default ``capped`` weighting, ``server_app/influence.py``), which the
   server applies before it merges; and the direction bound (``replies.direction_factor``)
   on the A-round's Grams, timed once per distinct Gram width and counted once per layer
   of that width (and the head).
2. Bytes uploaded per client per round, from the protobuf of real reply messages:
   LoRM (each round kind, and the mean over a 5-round task with its Gram exchange),
   FedAvg-LoRA (A, B and head), and what the paper's code ships per client and round (the
   whole network's state dict plus a dense Gram for every merged layer, float32; counted as
   raw tensor bytes, a lower bound since it pickles them).

Results are printed and written to ``bench/results/lorm_merge-<time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import timm
import torch
from flwr.common.serde import recorddict_to_proto

from bench import save_result
from fedcil.config import compose_config
from fedcil.protocol import ClientUpdate, encode_reply
from fedcil.tasks import split_for
from server_app.influence import InfluenceBounds, bound_influence, direction_ratios
from strategies import build_strategy
from strategies.lorm import client_summaries

TARGETS_S = {"diagonal": 0.1, "dense": 2.0}
DIM, MLP, BLOCKS, CLASSES, TASKS, CLIENTS = 768, 3072, 12, 100, 10, 10
SHAPES = {"attn.qkv": (3 * DIM, DIM), "attn.proj": (DIM, DIM), "mlp.fc1": (MLP, DIM), "mlp.fc2": (DIM, MLP)}


def vit_b16_state(rank: int) -> dict[str, torch.Tensor]:
    """A LoRA + head trainable state with ViT-B/16's layer names and shapes."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for block in range(BLOCKS):
        for kind, (d_out, d_in) in SHAPES.items():
            state[f"blocks.{block}.{kind}.lora_A"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            state[f"blocks.{block}.{kind}.lora_B"] = torch.randn(d_out, rank, generator=g) * 0.01
    state["head.weight"] = torch.randn(CLASSES, DIM, generator=g) * 0.01
    state["head.bias"] = torch.zeros(CLASSES)
    return state


def random_gram(dim: int, dense: bool, seed: int) -> torch.Tensor:
    """A positive definite Gram (dense) or its diagonal, float64."""
    g = torch.Generator().manual_seed(seed)
    if not dense:
        return torch.rand(dim, generator=g, dtype=torch.float64) * 100 + 1
    x = torch.randn(dim + 64, dim, generator=g, dtype=torch.float64)
    return x.T @ x


def client_grams(state: dict, dense: bool) -> dict[str, torch.Tensor]:
    """One Gram per distinct input width, shared by the layers (the sums' cost is the same)."""
    by_width = {width: random_gram(width, dense, width) for width in (DIM, MLP)}
    grams = {k.removesuffix(".lora_A"): by_width[v.shape[1]] for k, v in state.items() if k.endswith(".lora_A")}
    grams["head"] = random_gram(DIM, True, 1)  # the head's Gram is dense (head_gram_alpha = 0.5)
    return grams


def reply_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of a client's reply on the wire, float32 as clients send it."""
    return recorddict_to_proto(encode_reply({k: v.float() for k, v in tensors.items()}, 100, 0.0)).ByteSize()


def time_merge(strategy, round_in_task: int, updates: list[ClientUpdate], repeats: int) -> float:
    """Median seconds of one ``aggregate_round`` over ``repeats`` runs."""
    saved = {k: v.clone() for k, v in strategy.state.items()}
    times = []
    for _ in range(repeats):
        strategy.state = {k: v.clone() for k, v in saved.items()}
        start = time.perf_counter()
        strategy.aggregate_round(0, round_in_task, updates)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_bounds(strategy, round_in_task: int, updates: list[ClientUpdate]) -> float:
    """Seconds of one pass of the default influence bounds over a round's replies."""
    sums = strategy.weighted_sums(strategy.configure_round(0, round_in_task))
    start = time.perf_counter()
    bound_influence(updates, sums, InfluenceBounds())
    return time.perf_counter() - start


def time_directions(grams: dict[str, torch.Tensor]) -> float:
    """Seconds of the direction bound over ten clients' Grams per example of every adapted layer and the head.

    The layers of one width share a Gram here, so each width is timed once and counted per layer.
    """
    layers = {name: g for name, g in grams.items() if name != "head"}
    widths = Counter(g.shape[0] for g in layers.values())
    by_width = {g.shape[0]: g for g in layers.values()}
    total = 0.0
    for count, gram in [(widths[w], g) for w, g in by_width.items()] + [(1, grams["head"])]:
        per_example = [gram.float() * (1 + 0.01 * k) / 100 for k in range(CLIENTS)]
        start = time.perf_counter()
        direction_ratios(per_example)
        total += count * (time.perf_counter() - start)
    return total


def time_task_end(strategy, grams: dict, repeats: int) -> float:
    """Median seconds to fold a task's Grams in and compute the evaluated base deltas."""
    updates = [ClientUpdate(k, {f"{n}.G": g.float() for n, g in grams.items() if n != "head"}, 100, 0.0) for k in range(CLIENTS)]
    times = []
    for _ in range(repeats):
        strategy.task_sums, strategy.tasks_done = {}, 0
        start = time.perf_counter()
        strategy.end_task(0, updates)
        strategy.base_deltas()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rank: int, repeats: int) -> dict:
    """Merge times and upload sizes; see the module docstring."""
    state = vit_b16_state(rank)
    rows = range(0, CLASSES // TASKS)
    result: dict = {"rank": rank, "clients": CLIENTS, "layers": 4 * BLOCKS, "threads": torch.get_num_threads(), "seconds": {}, "bytes": {}}
    for name, dense in (("diagonal", False), ("dense", True)):
        cfg = compose_config("config", ["experiment=lorm_cifar100", f"lora.rank={rank}", f"method.gram_alpha={int(dense)}"])
        strategy = build_strategy(cfg, split_for(cfg, CLASSES), state)
        grams = client_grams(state, dense)
        seconds = {}
        for round_in_task, factor in ((1, "lora_A"), (0, "lora_B")):
            summary = {k: v.float() for k, v in client_summaries(state, grams, factor, rows, 100).items()}
            updates = [ClientUpdate(k, summary, 100, 0.0) for k in range(CLIENTS)]
            seconds[f"{factor[-1]}-round"] = time_merge(strategy, round_in_task, updates, repeats)
            seconds[f"{factor[-1]}-round bounds"] = time_bounds(strategy, round_in_task, updates)
            result["bytes"][f"lorm {name} {factor[-1]}-round"] = reply_bytes(summary)
        seconds["task end"] = time_task_end(strategy, grams, repeats)
        seconds["A-round directions"] = time_directions(grams)
        result["seconds"][name] = seconds
        task_end = reply_bytes({f"{n}.G": g for n, g in grams.items() if n != "head"})
        result["bytes"][f"lorm {name} task-end Grams"] = task_end
        kinds = ["B", "A", "B", "A", "B"]
        per_task = sum(result["bytes"][f"lorm {name} {k}-round"] for k in kinds) + task_end
        result["bytes"][f"lorm {name} mean per round (5-round task)"] = per_task // len(kinds)
    result["bytes"]["fedavg_lora"] = reply_bytes(state)
    network = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=CLASSES)
    dense_grams = 3 * BLOCKS * DIM**2 + BLOCKS * MLP**2 + DIM**2  # qkv, proj, fc1 (768), fc2 (3072), head
    result["bytes"]["paper code (state dict + dense Grams)"] = 4 * (sum(v.numel() for v in network.state_dict().values()) + dense_grams)
    return result


def report(result: dict) -> None:
    """Print the figures and ratios side by side."""
    print(f"ViT-B/16 shapes: {result['layers']} adapted layers, r = {result['rank']}, {result['clients']} clients, "
          f"{result['threads']} torch threads")
    print(f"\n{'server merge (s)':<18}{'A-round':>10}{'B-round':>10}{'task end':>10}   target")
    for name, seconds in result["seconds"].items():
        worst = max(seconds["A-round"], seconds["B-round"])
        verdict = "met" if worst < TARGETS_S[name] else "MISSED"
        print(f"{name:<18}{seconds['A-round']:>10.3f}{seconds['B-round']:>10.3f}{seconds['task end']:>10.3f}   "
              f"< {TARGETS_S[name]} s per round: {verdict}")
    print(f"\n{'influence bounds (s)':<18}{'A-round':>10}{'B-round':>10}{'directions':>12}   vs the round's merge")
    for name, seconds in result["seconds"].items():
        ratio = max(seconds[f"{k}-round bounds"] / seconds[f"{k}-round"] for k in "AB")
        print(f"{name:<18}{seconds['A-round bounds']:>10.3f}{seconds['B-round bounds']:>10.3f}"
              f"{seconds['A-round directions']:>12.3f}   up to {ratio:.1f}x")
    base = result["bytes"]["fedavg_lora"]
    print(f"\n{'upload per client per round':<48}{'bytes':>14}{'vs FedAvg-LoRA':>16}")
    for name, size in result["bytes"].items():
        print(f"{name:<48}{size:>14,}{size / base:>16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.rank, args.repeats)
    report(result)
    save_result("lorm_merge", result)


if __name__ == "__main__":
    main()
