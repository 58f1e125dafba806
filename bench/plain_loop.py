"""The same federated run as a plain loop without Flower: one worker process per core.

Each round the main process sends every client's request to a process pool (spawned
workers import torch afresh, as Ray actors do), merges the replies with the same
strategy, and evaluates at the end of each task exactly like the ServerApp.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from client_app.local_round import run_local_round
from fedcil.config import compose_config
from fedcil.experiment import experiment_for
from fedcil.protocol import ClientUpdate, RoundPlan, TrainRequest, canonical_order
from server_app.federation import RoundExchange
from server_app.loop import Evaluator, train_round
from strategies import build_strategy


@dataclass
class PlainRun:
    """Accuracy matrix and timings of a plain-loop run."""

    accuracy_matrix: list[list[float]]
    round_seconds: list[float]
    first_round_start: float  # seconds from the call to the start of round 1
    wall_seconds: float


def _client_round(config_name: str, overrides: list[str], request: TrainRequest, client: int) -> ClientUpdate:
    cfg = compose_config(config_name, overrides)
    torch.set_num_threads(max(1, int(cfg.client_resources.num_cpus)))
    tensors, count, loss = run_local_round(cfg, request, client, cfg.num_clients)
    return ClientUpdate(client, tensors, count, loss)


def run_plain(config_name: str, overrides: list[str], processes: int) -> PlainRun:
    """Run every task and round of the config; ``processes=0`` trains in this process."""
    started = time.monotonic()
    cfg = compose_config(config_name, overrides)
    experiment = experiment_for(cfg)
    evaluator = Evaluator(cfg, experiment)
    strategy = build_strategy(cfg, evaluator.model.initial_state)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) if processes else None

    def send(plan: RoundPlan, task: int, server_round: int, clients: list[int]) -> RoundExchange:
        request = TrainRequest(task, server_round, plan.state, plan.train_groups, dict(plan.extra), dict(plan.base))
        args = [(config_name, overrides, request, k) for k in clients]
        updates = list(pool.map(_client_round, *zip(*args))) if pool else [_client_round(*a) for a in args]
        return RoundExchange(canonical_order(updates), bytes_up=0, bytes_down=0, sampled=clients)

    matrix, round_seconds = [], []
    rng = np.random.default_rng(cfg.seed)
    first_round_start = time.monotonic() - started
    try:
        for task in range(cfg.num_tasks):
            strategy.start_task(task)
            for server_round in range(cfg.rounds_per_task):
                round_start = time.monotonic()
                train_round(send, cfg, strategy, list(range(cfg.num_clients)), rng, task, server_round)
                if server_round == cfg.rounds_per_task - 1:
                    matrix.append(evaluator(strategy, task)[0])
                round_seconds.append(time.monotonic() - round_start)
    finally:
        if pool:
            pool.shutdown()
    return PlainRun(matrix, round_seconds, first_round_start, time.monotonic() - started)
