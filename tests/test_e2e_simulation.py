"""Real Flower simulations (SuperLink, SuperExec, Ray) driven through ``fcil-run``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedcil.cli.run import (
    APP_DIR, FlowerSite, flower_env, launch, listening_process, run_status, stop_superlink, superlink_running,
)

pytestmark = pytest.mark.e2e

RESULT_KEYS = {
    "method", "dataset", "num_tasks", "num_clients", "accuracy_matrix", "faa", "faa_weighted", "aia",
    "forgetting", "bwt", "bytes_up", "bytes_down", "rounds", "wall_seconds", "config",
}
TINY = ["num_tasks=2", "rounds_per_task=2", "num_clients=3", "local_epochs=3"]


@pytest.fixture
def flower_home(tmp_path, monkeypatch):
    """A private FLWR_HOME and SuperLink port; checks no SuperLink is left running."""
    site = FlowerSite.isolated(tmp_path / "flwr-home")
    monkeypatch.setenv("FLWR_HOME", str(site.home))
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(site.port))
    yield tmp_path
    assert not superlink_running(site.port)
    assert listening_process(site.port) is None


def check_results(out: Path, dataset: str, num_classes_per_task: int, method: str = "fedavg_lora") -> dict:
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert (results["method"], results["dataset"], results["num_tasks"], results["num_clients"]) == (
        method, dataset, 2, 3)
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and None not in matrix[1]
    # above chance: the first task's accuracy right after it (chance = 1 / classes in it)
    assert matrix[0][0] > 100 / num_classes_per_task + 10
    assert results["faa"] == pytest.approx(sum(matrix[1]) / 2)
    assert len(results["rounds"]) == 4 and all(r["clients"] == 3 for r in results["rounds"])
    assert results["bytes_up"] == sum(r["bytes_up"] for r in results["rounds"]) > 0
    assert results["bytes_down"] == sum(r["bytes_down"] for r in results["rounds"]) > 0
    if method != "analytic":  # its requests carry no tensor; the others send the model every round
        assert results["bytes_down"] > results["bytes_up"] / 3
    assert results["config"]["dataset"]["name"] == dataset
    for name in ("rounds.csv", "accuracy_matrix.png", "accuracy_per_task.png"):
        assert (out / name).stat().st_size > 0
    assert len((out / "rounds.csv").read_text().strip().splitlines()) == 5
    return results


# LoRM trains one factor per round, so on the random backbone it needs more local epochs
# than FedAvg-LoRA to clear the learning bar in two rounds.
@pytest.mark.parametrize(
    "method, extra",
    [("fedavg_lora", []), ("lorm", ["local_epochs=6"]), ("ffa_lora", []), ("fedex_lora", []), ("talora", []),
     ("head_only", ["lr=0.05", "local_epochs=5"]), ("analytic", ["method.projection_dim=64"])],
)
def test_digits_simulation_matches_the_inprocess_backend(flower_home, method, extra):
    """Flower and ``backend=inprocess`` run the same loop: same accuracies, same message sizes."""
    overrides = [*TINY, "partition=iid", f"method={method}", *extra]
    flower = check_results(launch("config", [*overrides, f"output_dir={flower_home / 'flower'}"]), "digits", 5, method)
    local = check_results(
        launch("config", [*overrides, "backend=inprocess", f"output_dir={flower_home / 'local'}"]), "digits", 5, method
    )
    assert local["accuracy_matrix"] == flower["accuracy_matrix"]
    for ours, theirs in zip(local["rounds"], flower["rounds"]):
        # the same records; a Flower message adds its metadata (up to about 200 bytes) to them,
        # which dominates the small messages of head_only and analytic
        metadata = 200 * 2 * theirs["clients"]  # a round's messages: train (and end-of-task statistics)
        assert ours["bytes_up"] == pytest.approx(theirs["bytes_up"], rel=0.01, abs=metadata)
        assert ours["bytes_down"] == pytest.approx(theirs["bytes_down"], rel=0.01, abs=metadata)
        assert ours["bytes_up"] <= theirs["bytes_up"] and ours["bytes_down"] <= theirs["bytes_down"]


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_simulation(flower_home):
    out = launch(
        "config",
        [*TINY, "dataset=fashion_mnist", "train_per_class=200", "test_per_class=200", f"output_dir={flower_home / 'fm'}"],
    )
    check_results(out, "fashion_mnist", 5)


def test_a_failing_server_app_is_reported(flower_home):
    """A run that fails inside the ServerApp (missing data) is an error, not a silent exit 0."""
    with pytest.raises(RuntimeError, match="finished:failed.*not found in /nonexistent"):
        launch("config", [*TINY, "dataset=fashion_mnist", "dataset.root=/nonexistent", f"output_dir={flower_home / 'x'}"])


def test_federation_smaller_than_num_clients_fails_clearly(flower_home):
    """Plain `flwr run` with 2 SuperNodes for a 3-client config: the run fails and says why."""
    site = FlowerSite.from_env()
    env = flower_env(site)
    command = [
        "flwr", "run", str(APP_DIR), "--stream", "--federation-config", "num-supernodes=2",
        "--run-config", 'overrides="num_clients=3 node_wait_seconds=1"',
    ]
    try:
        out = subprocess.run(command, env=env, cwd=flower_home, capture_output=True, text=True, timeout=300)
        run_id = re.search(r"Successfully started run (\d+)", out.stdout).group(1)
        status, details = run_status(run_id, env, flower_home)
    finally:
        stop_superlink(site.port)
    assert status == "finished:failed"
    assert "num_clients=3 but the federation has 2 SuperNodes" in details + out.stdout


def test_plain_flwr_run_in_the_app_directory_uses_the_default_federation(flower_home):
    """`flwr run .` with no options, as a Flower user types it: Flower's default federation
    (2 SuperNodes) runs the quickstart config with 2 clients, since the run does not choose."""
    site = FlowerSite.from_env()
    env = flower_env(site)
    outputs = APP_DIR / "outputs"
    before = set(outputs.iterdir()) if outputs.is_dir() else set()
    try:
        out = subprocess.run(["flwr", "run", "."], env=env, cwd=APP_DIR, capture_output=True, text=True, timeout=120)
        run_id = re.search(r"Successfully started run (\d+)", out.stdout).group(1)
        deadline = time.monotonic() + 400
        status, details = run_status(run_id, env, APP_DIR)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2)
            status, details = run_status(run_id, env, APP_DIR)
    finally:
        stop_superlink(site.port)
    new = sorted(set(outputs.iterdir()) - before) if outputs.is_dir() else []
    try:
        assert status == "finished:completed", details
        assert len(new) == 1
        results = json.loads((new[0] / "results.json").read_text())
        assert results["num_clients"] == results["config"]["num_clients"] == 2
        assert len(results["accuracy_matrix"]) == 5 and all(r["clients"] == 2 for r in results["rounds"])
    finally:
        for folder in new:
            shutil.rmtree(folder)
