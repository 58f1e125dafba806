"""The federated class-incremental run: tasks x rounds, evaluation, results files."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedcil.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcil.config import chooses_num_clients, compose_config, to_container
from fedcil.shapes import declared_shape
from fedcil.experiment import Experiment, experiment_for
from fedcil.model import FCILModel, model_for, resolve_device, set_base_deltas, set_sent_state
from fedcil.protocol import EVAL_COUNT, EVAL_CORRECT, Packing, RoundPlan, canonical_order, encode_request
from fedcil.results import finish_run, resolve_output_dir
from fedcil.settings import check_settings, evaluates_every_round
from fedcil.tasks import TaskSplit, split_for
from fedcil.training import accuracies, correct_per_task, evaluate_seen_tasks
from fedcil.secagg.server import SecAggSettings
from server_app.influence import InfluenceBounds, bound_influence, largest_ratio
from server_app.federation import Post, RoundExchange, Send, flower_post, sample_nodes, wait_for_federation, wait_for_nodes
from server_app.privacy import CentralPrivacy
from server_app.secure import secure_sender
from server_app.update_bounds import bound_update_sizes
from server_app.validation import InvalidReply, ReplyLimits, TooFewReplies, checked_update, clipped
from strategies import FederatedStrategy, build_strategy


@dataclass
class Evaluation:
    """Per-task accuracy (percent) and test-sample counts, and the bytes evaluating cost."""

    accuracies: list[float]
    counts: list[int]
    bytes_up: int = 0
    bytes_down: int = 0


class ServerEvaluator:
    """``evaluation: server``: the server evaluates on its own copy of the test set."""

    def __init__(self, cfg: DictConfig, experiment: Experiment, model: FCILModel) -> None:
        self.experiment, self.model = experiment, model
        self.batch_size = cfg.eval_batch_size
        self.device = resolve_device(cfg.device)

    def __call__(self, strategy: FederatedStrategy, task: int, round_in_task: int) -> Evaluation:
        set_sent_state(self.model, strategy.evaluation_state())
        set_base_deltas(self.model, strategy.base_deltas())
        return Evaluation(*evaluate_seen_tasks(self.model, self.experiment, task, self.batch_size, self.device))

    def diagnose(self, strategy: FederatedStrategy, task: int) -> dict[str, dict[str, list[float]]]:
        """After the last task ``task``: per task, the evaluated model's accuracy with the task id
        given (``task_aware``), and both accuracies of each of the strategy's diagnostic models."""
        models = {"merged": [(strategy.evaluation_state(), strategy.base_deltas())] * (task + 1)}
        diagnostics = {}
        for name, per_task in {**models, **strategy.diagnostic_models()}.items():
            scores: dict[str, list[float]] = {"accuracy": [], "task_aware_accuracy": []}
            for i, (state, deltas) in enumerate(per_task):
                set_sent_state(self.model, state)
                set_base_deltas(self.model, deltas)
                own = self.experiment.test_indices(i)
                for key, aware in (("accuracy", False), ("task_aware_accuracy", True)):
                    correct, counts = correct_per_task(
                        self.model, self.experiment, task, self.batch_size, self.device, among=own, task_aware=aware
                    )
                    scores[key].append(accuracies(correct, counts)[i])
            diagnostics[name] = scores
        return diagnostics


class ClientEvaluator:
    """``evaluation: clients``: every node evaluates on its own test shard; the server sums the counts.

    The shards split the test set without overlap, so the sums are the counts over the
    whole test set. The server loads no data.
    """

    def __init__(self, send: Send, nodes: list[int]) -> None:
        self.send, self.nodes = send, nodes

    def __call__(self, strategy: FederatedStrategy, task: int, round_in_task: int) -> Evaluation:
        result = self.send(strategy.evaluation_plan(), task, round_in_task, self.nodes)
        correct = sum(u.tensors[EVAL_CORRECT] for u in result.updates)
        counts = sum(u.tensors[EVAL_COUNT] for u in result.updates)
        correct, counts = [round(c) for c in correct.tolist()], [round(n) for n in counts.tolist()]
        return Evaluation(accuracies(correct, counts), counts, result.bytes_up, result.bytes_down)


def server_model(cfg: DictConfig) -> tuple[FCILModel, TaskSplit, Experiment | None]:
    """The model the server evaluates, the run's task split (built once here) and the test data.

    With ``evaluation: clients`` the server loads no data (``None``): shapes come from the config.
    """
    if cfg.evaluation == "clients":
        shape, experiment = declared_shape(cfg.dataset), None
        split = split_for(cfg, shape.num_classes)
    else:
        experiment = experiment_for(cfg)
        shape, split = experiment.data, experiment.split
    return model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size), split, experiment


def train_round(
    send: Send, cfg: DictConfig, strategy: FederatedStrategy, nodes: list[int],
    rng: np.random.Generator | None, task: int, round_in_task: int, privacy: CentralPrivacy = CentralPrivacy(),
) -> RoundExchange:
    """Sample clients (from ``rng``, or in secret with ``None``), send the strategy's plan, merge the valid
    replies (noised with ``dp``); the exchange.

    After a task's last round, the strategy's statistics request (if any) goes to every
    node and its replies go to ``strategy.end_task``; its bytes count in this round.
    """
    sampled = sample_nodes(nodes, cfg.fraction_train, rng)
    training = strategy.configure_round(task, round_in_task)
    result = send(training, task, round_in_task, sampled)
    strategy.aggregate_round(task, round_in_task, result.updates)
    strategy.state.update(privacy.noise(strategy.state, training.train_groups, result.updates))
    if round_in_task == cfg.rounds_per_task - 1:
        plan = strategy.task_end_plan(task)
        statistics = send(plan, task, round_in_task, nodes) if plan else None
        strategy.end_task(task, statistics.updates if statistics else [])
        if statistics:
            result.bytes_up += statistics.bytes_up
            result.bytes_down += statistics.bytes_down
            result.failed.update(statistics.failed)
            result.capped.update(statistics.capped)
            result.direction_ratio = largest_ratio(result.direction_ratio, statistics.direction_ratio)
    return result


def plain_sender(post: Post) -> Send:
    """A :data:`Send` that delivers every node the plan's request (replies not yet checked)."""

    def send(plan: RoundPlan, task: int, round_in_task: int, nodes: list[int]) -> RoundExchange:
        content = encode_request(plan, task, round_in_task)
        return post({node: content for node in nodes}, MessageType.EVALUATE if plan.evaluates else MessageType.TRAIN)

    return send


def checked_sender(post: Post, cfg: DictConfig, strategy: FederatedStrategy) -> Send:
    """The run's :data:`Send`: replies checked one by one (:func:`screened`), or securely summed
    (:func:`server_app.secure.secure_sender`) with ``secagg.enabled``; their Grams packed (:func:`packing_grams`)."""
    settings = SecAggSettings.from_config(cfg.secagg)
    if settings.enabled:
        send = secure_sender(post, strategy, settings, ReplyLimits.from_config(cfg), cfg.min_replies,
                             InfluenceBounds.from_config(cfg).psd_tolerance)
    else:
        send = screened(plain_sender(post), cfg, strategy)
    return packing_grams(send, strategy, cfg.replies.gram_dtype)


def packing_grams(send: Send, strategy: FederatedStrategy, dtype: str) -> Send:
    """``send`` whose plans ask clients to pack the square Grams the strategy declares for them
    (``weighted_sums(plan).grams``), in at most ``dtype`` (``replies.gram_dtype``)."""

    def send_packed(plan: RoundPlan, task: int, round_in_task: int, nodes: list[int]) -> RoundExchange:
        packing = Packing.of(strategy.weighted_sums(plan), strategy.expected_reply(plan, task), dtype)
        return send(replace(plan, packing=packing), task, round_in_task, nodes)

    return send_packed


def screened(send: Send, cfg: DictConfig, strategy: FederatedStrategy) -> Send:
    """``send`` whose result holds only valid updates (:mod:`server_app.validation`), in canonical order.

    What a valid reply carries is the strategy's to say (``strategy.expected_reply``).

    Invalid replies are logged with the node and the reason and recorded in ``failed``;
    with ``replies.clip_norm`` trained tensors are clipped; the influence bounds
    (:mod:`server_app.influence`) drop replies whose Grams fail their checks and cut
    weights, and the update-size bounds (:mod:`server_app.update_bounds`) cut trained
    tensors' updates (both recorded in ``capped``); fewer than ``min_replies``
    valid replies (capped at the nodes asked) raise :class:`TooFewReplies`.
    """
    limits, bounds = ReplyLimits.from_config(cfg), InfluenceBounds.from_config(cfg)

    def send_and_check(plan: RoundPlan, task: int, round_in_task: int, nodes: list[int]) -> RoundExchange:
        result = send(plan, task, round_in_task, nodes)
        expected = strategy.expected_reply(plan, task)
        clip = limits.clip_norm is not None and plan.returns_trained_tensors
        for node, content in result.replies:
            try:
                update = checked_update(node, content, expected, limits, plan.packing)
            except InvalidReply as exc:
                result.failed[node] = f"invalid reply: {exc}"
                log(WARNING, "task %d round %d: reply of node %s dropped: %s", task + 1, round_in_task + 1, node, exc)
                continue
            result.updates.append(clipped(update, plan.state, limits.clip_norm) if clip else update)
        if not plan.evaluates:
            bounded = bound_influence(result.updates, strategy.weighted_sums(plan), bounds)
            for node, reason in bounded.dropped.items():
                result.failed[node] = f"out of bounds: {reason}"
                log(WARNING, "task %d round %d: reply of node %s dropped: %s", task + 1, round_in_task + 1, node, reason)
            result.updates, result.capped, result.direction_ratio = bounded.updates, bounded.capped, bounded.direction_ratio
        if plan.returns_trained_tensors and limits.update_factor is not None:
            result.updates, cut = bound_update_sizes(result.updates, plan.state, limits.update_factor, cfg.local_epochs,
                                                     cfg.batch_size)
            for node, note in cut.items():
                result.capped[node] = f"{result.capped[node]}; {note}" if node in result.capped else note
        needed = min(cfg.min_replies, len(nodes))
        if len(result.updates) < needed:
            raise TooFewReplies(
                f"task {task + 1} round {round_in_task + 1}: {len(result.updates)} valid client replies, "
                f"min_replies={cfg.min_replies} needed; stopping (the checkpoint of the last finished round is kept)"
            )
        result.updates = canonical_order(result.updates)
        return result

    return send_and_check


def round_record(task: int, round_in_task: int, result: RoundExchange, accuracy: float | None, seconds: float,
                 privacy: CentralPrivacy = CentralPrivacy()) -> dict:
    """One round's entry of ``results.json`` (``rounds``).

    With ``dp`` the clients' mean training loss (not noised) is withheld (``null``); with a secret
    sample (``dp.secret_sampling``) so are the nodes that failed or were capped: only their counts.
    """
    updates = result.updates
    loss = float(np.average([u.loss for u in updates], weights=[u.num_examples for u in updates]))
    nodes = ({"withheld_nodes": {"failed": len(result.failed), "capped": len(result.capped)}} if privacy.hides_sample else {
        "missing": sorted(result.failed),
        "failures": {str(node): reason for node, reason in sorted(result.failed.items())},
        "capped": {str(node): note for node, note in sorted(result.capped.items())},
    })
    return {
        "task": task, "round": round_in_task, "clients": sum(u.clients for u in updates),
        "loss": None if privacy.enabled else loss, "accuracy": accuracy,
        "bytes_up": result.bytes_up, "bytes_down": result.bytes_down, "seconds": seconds, **nodes,
        **({} if result.authenticated is None else {"authenticated_keys": result.authenticated}),
        **({} if result.direction_ratio is None else {"largest_direction_ratio": asdict(result.direction_ratio)}),
    }


def run_experiment(grid: Grid, config_name: str, overrides: list[str]) -> dict:
    """Run every task and round of the config on ``grid``; write and return the results.

    A run that does not choose ``num_clients`` (:func:`fedcil.config.chooses_num_clients`)
    has as many clients as the federation has SuperNodes.
    """
    started = time.monotonic()
    cfg = compose_config(config_name, overrides)
    if chooses_num_clients(overrides):
        nodes = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_seconds)
    else:
        nodes = wait_for_federation(grid, cfg.node_wait_seconds)
        cfg = compose_config(config_name, [*overrides, f"num_clients={len(nodes)}"])
        log(INFO, "num_clients=%d, the federation's SuperNodes (set num_clients to require a number)", len(nodes))
    return run_rounds(flower_post(grid, cfg.round_timeout), nodes, cfg, started)


def run_rounds(post: Post, nodes: list[int], cfg: DictConfig, started: float | None = None) -> dict:
    """Every task and round of ``cfg`` through ``post`` to ``nodes``; write and return the results.

    The one task/round loop, whatever carries the messages (Flower, or the in-process
    sender of :mod:`fedcil.cli.inprocess`). ``started`` (``time.monotonic()``) counts
    earlier set-up into the run's times. With ``checkpoint`` a checkpoint is written after
    every round; with ``resume=<dir>`` the run goes on from the checkpoint there.
    """
    started, started_at = started or time.monotonic(), time.time()
    check_settings(cfg)
    output_dir = resolve_output_dir(cfg)
    model, split, experiment = server_model(cfg)
    strategy = build_strategy(cfg, split, model.initial_state)
    privacy = CentralPrivacy.from_config(cfg)
    send = checked_sender(post, cfg, strategy)
    evaluator = ClientEvaluator(send, nodes) if experiment is None else ServerEvaluator(cfg, experiment, model)
    rng = None if privacy.hides_sample else np.random.default_rng(cfg.seed)  # None: sampled in secret
    num_tasks, rounds_per_task = split.num_tasks, cfg.rounds_per_task
    every_round = evaluates_every_round(cfg)
    accuracy_matrix: list[list[float | None]] = []
    rounds: list[dict] = []
    counts: list[int] = []
    first_task, first_round = 0, 0
    if cfg.resume:
        checkpoint, tensors = load_checkpoint(Path(cfg.resume), to_container(cfg))
        strategy.restore(tensors, checkpoint.values)
        if rng is not None:
            rng.bit_generator.state = checkpoint.rng_state
        accuracy_matrix, rounds, counts = checkpoint.accuracy_matrix, checkpoint.rounds, checkpoint.counts
        first_task, first_round = checkpoint.next_position(rounds_per_task)
        log(INFO, "resuming %s after task %d round %d", cfg.resume, checkpoint.task + 1, checkpoint.round_in_task + 1)
    log(INFO, "%s on %s: %d tasks x %d rounds, %d clients, output %s",
        cfg.method.name, cfg.dataset.name, num_tasks, rounds_per_task, len(nodes), output_dir)

    setup_seconds = time.monotonic() - started
    restored = len(rounds)
    for task in range(first_task, num_tasks):
        if not (task == first_task and first_round > 0):  # a resumed task already started
            strategy.start_task(task)
        for round_in_task in range(first_round if task == first_task else 0, rounds_per_task):
            round_start = time.monotonic()
            privacy.check_budget(len(rounds), task, round_in_task)  # every round so far was noised
            result = train_round(send, cfg, strategy, nodes, rng, task, round_in_task, privacy)
            last = round_in_task == rounds_per_task - 1
            accuracy = None
            if every_round or last:
                evaluation = evaluator(strategy, task, round_in_task)
                per_task, counts = evaluation.accuracies, evaluation.counts
                accuracy = float(np.average(per_task, weights=counts))
                result.bytes_up += evaluation.bytes_up
                result.bytes_down += evaluation.bytes_down
                if last:
                    accuracy_matrix.append(per_task + [None] * (num_tasks - task - 1))
            record = round_record(task, round_in_task, result, accuracy, time.monotonic() - round_start, privacy)
            rounds.append(record | strategy.record() | privacy.record(len(rounds) + 1))
            if cfg.checkpoint:
                tensors, values = strategy.checkpoint()
                save_checkpoint(output_dir, Checkpoint(
                    task, round_in_task, accuracy_matrix, counts, rounds, None if rng is None else rng.bit_generator.state,
                    values, to_container(cfg),
                ), tensors)
            remaining = num_tasks * rounds_per_task - len(rounds)
            eta = (time.monotonic() - started) / (len(rounds) - restored) * remaining
            log(INFO, "[task %d/%d round %d/%d] loss %s  acc(seen) %s  clients %d  %.1fs  ETA %ds",
                task + 1, num_tasks, round_in_task + 1, rounds_per_task,
                "-" if rounds[-1]["loss"] is None else f"{rounds[-1]['loss']:.4f}",
                "-" if accuracy is None else f"{accuracy:.2f}%", rounds[-1]["clients"], rounds[-1]["seconds"], eta)

    diagnostics = evaluator.diagnose(strategy, num_tasks - 1) if isinstance(evaluator, ServerEvaluator) else {}
    timing = (started, started_at, setup_seconds)
    return finish_run(cfg, output_dir, accuracy_matrix, counts, rounds, timing, lambda message: log(INFO, "%s", message),
                      diagnostics, privacy.summary(len(rounds)))
