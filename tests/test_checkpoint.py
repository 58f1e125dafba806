"""Checkpoints after every round; a run killed mid-way and resumed ends as if never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedcil.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcil.errors import ConfigError
from fedcil.cli.run import APP_DIR, launch

RUN = ["num_tasks=2", "rounds_per_task=3", "num_clients=3", "local_epochs=2", "backend=inprocess"]


def start_run(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedcil.cli.run", *overrides], cwd=APP_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_rounds(proc: subprocess.Popen, state: Path, rounds: int, timeout: float = 300) -> int:
    """SIGKILL ``proc`` once its checkpoint records ``rounds`` rounds; the rounds it had."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads(state.read_text())["rounds"])
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= rounds:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run ended or stalled before it could be interrupted")


@pytest.mark.parametrize("method", ["lorm", "talora", "fedex_lora"])
def test_a_killed_run_resumed_equals_an_uninterrupted_one(tmp_path, method):
    overrides = [*RUN, f"method={method}"]
    whole = json.loads((launch("config", [*overrides, f"output_dir={tmp_path / 'whole'}"]) / "results.json").read_text())

    cut = tmp_path / "cut"
    done = kill_after_rounds(start_run([*overrides, f"output_dir={cut}"]), cut / "checkpoint.json", rounds=3)
    assert not (cut / "results.json").exists()  # really stopped mid-way
    # A kill may land between the new state file and the old tensors file's removal: the state
    # always names a complete tensors file, and resuming clears whatever older one is left.
    assert (cut / json.loads((cut / "checkpoint.json").read_text())["tensors_file"]).is_file()
    resumed = json.loads((launch("config", [*overrides, f"resume={cut}"]) / "results.json").read_text())
    assert [p.name for p in cut.glob("*checkpoint-*")] == ["checkpoint-6.safetensors"]

    assert 3 <= done < 6  # killed in the second task, after the first task's merge
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [r["loss"] for r in resumed["rounds"]] == [r["loss"] for r in whole["rounds"]]
    assert [(r["task"], r["round"]) for r in resumed["rounds"]] == [(t, r) for t in range(2) for r in range(3)]


def test_resume_refuses_other_settings_and_keeps_the_checkpoint(tmp_path):
    out = launch("config", ["num_tasks=2", "rounds_per_task=1", "num_clients=3", "local_epochs=1",
                            "backend=inprocess", f"output_dir={tmp_path / 'run'}"])
    before = (out / "checkpoint.json").read_bytes()
    with pytest.raises(ConfigError, match="other settings of lr, seed; resume with the same config"):
        launch("config", ["num_tasks=2", "rounds_per_task=1", "num_clients=3", "local_epochs=1", "lr=0.1", "seed=4",
                          "backend=inprocess", f"resume={out}"])
    assert (out / "checkpoint.json").read_bytes() == before


def test_resume_from_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint.json there"):
        launch("config", ["num_tasks=2", "num_clients=3", "backend=inprocess", f"resume={tmp_path}"])


def test_saving_replaces_the_state_and_leaves_only_its_own_tensors_file(tmp_path):
    """What a kill after the state write leaves behind (an older tensors file) goes at the next save."""
    (tmp_path / "checkpoint-2.safetensors").write_bytes(b"left by a killed run")
    state = Checkpoint(task=1, round_in_task=0, accuracy_matrix=[[50.0]], counts=[10], rounds=[{}, {}, {}],
                       rng_state={}, values={"k": 1}, config={"seed": 0})
    save_checkpoint(tmp_path, state, {"w": torch.arange(4.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.safetensors", "checkpoint.json"]
    loaded, tensors = load_checkpoint(tmp_path, {"seed": 0, "output_dir": "elsewhere"})
    assert loaded == state and torch.equal(tensors["w"], torch.arange(4.0))
