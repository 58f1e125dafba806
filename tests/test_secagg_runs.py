"""Whole runs with secure aggregation: the same accuracies as without it, in process, in a
Flower simulation (and, in test_deployment, in the TLS deployment); too many dropouts stop
a run with its checkpoint kept."""

from __future__ import annotations

import json

import pytest
from flwr.app import MessageType

from fedcil.checkpoint import load_checkpoint
from fedcil.cli.inprocess import inprocess_post, run_inprocess
from fedcil.cli.run import launch
from fedcil.config import compose_config, to_container
from fedcil.secagg.client import RECORD
from server_app.loop import run_rounds
from server_app.validation import TooFewReplies

TINY = ["num_tasks=2", "rounds_per_task=2", "num_clients=3", "local_epochs=2", "partition=iid",
        "train_per_class=40", "test_per_class=30"]
SECURE = ["secagg.enabled=true", "replies.weighting=claimed", "replies.update_factor=null"]  # what secagg needs
TOLERANCE = 1.0  # points of accuracy per entry of the matrix; the runs below measure 0


def matrices_agree(secure: list, plain: list) -> bool:
    return all(
        (a is None and b is None) or abs(a - b) <= TOLERANCE for row_a, row_b in zip(secure, plain, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )


@pytest.mark.parametrize(("method", "extra"), [("lorm", ["evaluation=clients"]), ("fedavg_lora", ["secagg.modulus_bits=32"])])
def test_a_secure_run_has_the_accuracies_of_the_plain_run(tmp_path, method, extra):
    run = [*TINY, f"method={method}", *extra, "checkpoint=false"]
    plain = run_inprocess(compose_config("config", [*run, f"output_dir={tmp_path / 'plain'}"]))
    secure = run_inprocess(compose_config("config", [*run, *SECURE, f"output_dir={tmp_path / 'secure'}"]))
    assert matrices_agree(secure["accuracy_matrix"], plain["accuracy_matrix"])
    assert [r["clients"] for r in secure["rounds"]] == [3, 3, 3, 3]
    # a masked entry is 8 bytes (4 with 32 bits) where a plain one is 4; keys and shares add little
    ratios = [s["bytes_up"] / p["bytes_up"] for s, p in zip(secure["rounds"], plain["rounds"])]
    low, high = (0.8, 1.2) if "secagg.modulus_bits=32" in extra else (1.5, 2.5)
    assert all(low < ratio < high for ratio in ratios), ratios


def dropping_post(cfg, leaving: set[int], from_round: int):
    """The in-process post whose ``leaving`` nodes drop out after sharing keys, from a round on."""
    honest = inprocess_post(cfg)
    position = {"round": 0}

    def post(contents, kind):
        content = next(iter(contents.values()))
        stage = content.config_records[RECORD]["stage"] if RECORD in content.config_records else None
        if stage == "setup" and kind == MessageType.TRAIN:
            config = content.config_records["config"]
            position["round"] = int(config["task"]) * cfg.rounds_per_task + int(config["round"])
        result = honest(contents, kind)
        if stage == "collect" and position["round"] >= from_round:
            result.replies = [(n, c) for n, c in result.replies if n not in leaving]
            result.failed.update({n: "no reply before the round timeout" for n in leaving})
        return result

    return post


def test_a_dropout_is_recovered_from_and_too_many_stop_the_run_with_the_checkpoint_kept(tmp_path):
    run = [*TINY, "method=head_only", "num_clients=4", *SECURE]  # a request that changes every round
    cfg = compose_config("config", [*run, f"output_dir={tmp_path / 'one'}"])
    one_left = run_rounds(dropping_post(cfg, {3}, from_round=1), [0, 1, 2, 3], cfg)
    assert [r["clients"] for r in one_left["rounds"]] == [4, 3, 3, 3]
    assert one_left["rounds"][1]["failures"] == {"3": "no reply before the round timeout"}

    cfg = compose_config("config", [*run, f"output_dir={tmp_path / 'two'}"])
    with pytest.raises(TooFewReplies, match="2 clients dropped out after sharing keys; .* threshold 3"):
        run_rounds(dropping_post(cfg, {2, 3}, from_round=2), [0, 1, 2, 3], cfg)
    checkpoint, _ = load_checkpoint(tmp_path / "two", to_container(cfg))
    assert (checkpoint.task, checkpoint.round_in_task) == (0, 1)
    resumed = compose_config("config", [*run, f"resume={tmp_path / 'two'}", f"output_dir={tmp_path / 'two'}"])
    whole = run_inprocess(compose_config("config", [*run, f"output_dir={tmp_path / 'whole'}"]))
    assert matrices_agree(run_inprocess(resumed)["accuracy_matrix"], whole["accuracy_matrix"])


@pytest.mark.e2e
def test_a_secure_flower_simulation_has_the_accuracies_of_the_plain_inprocess_run(tmp_path):
    run = [*TINY, "method=lorm", "evaluation=clients"]
    flower = json.loads((launch("config", [*run, *SECURE, f"output_dir={tmp_path / 'flower'}"]) / "results.json").read_text())
    plain = run_inprocess(compose_config("config", [*run, "backend=inprocess", f"output_dir={tmp_path / 'plain'}"]))
    assert matrices_agree(flower["accuracy_matrix"], plain["accuracy_matrix"])
    assert [r["clients"] for r in flower["rounds"]] == [3, 3, 3, 3] and not any(r["missing"] for r in flower["rounds"])
