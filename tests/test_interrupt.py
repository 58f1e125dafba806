"""Ctrl-C (SIGINT) and SIGTERM stop ``fcil-run`` cleanly, and its SuperLink is its own.

Real runs in subprocesses, signalled as a terminal does (the whole process group): the
run stops with exit code 130 (143 for SIGTERM), keeps its checkpoint, leaves no process
behind, and prints the command that continues it, which then finishes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from fedcil.cli.run import (
    DEFAULT_PORT, FlowerSite, Interrupted, flower_env, free_port, interrupted_line, listening_process, stop_processes,
    superlink_running,
)
from fedcil.cli.sweep import same_config

FCIL_RUN = Path(sys.executable).parent / "fcil-run"
SMALL = ["num_tasks=2", "num_clients=2", "partition=iid", "train_per_class=40"]
ROUNDS = 10  # 2 tasks x 5 rounds: the run is far from its end when the first checkpoint appears
FLOWER_RUN = [*SMALL, "rounds_per_task=5", "local_epochs=2"]
FLOWER_VARIABLES = ("FLWR_HOME", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


class Running:
    """``fcil-run`` in a session of its own (as from a terminal), its output collected as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in FLOWER_VARIABLES}
        self.proc = subprocess.Popen([str(FCIL_RUN), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready: Callable[[], object], timeout: float = 400) -> None:
        """Wait until ``ready()`` while the run goes on; fail if it ends or stalls first."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"fcil-run ended early:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"fcil-run stalled:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def match(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.output)

    def processes(self) -> list[psutil.Process]:
        """fcil-run and every process below it now (flwr, the SuperLink, SuperExec, the simulation, Ray)."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def running(procs: list[psutil.Process]) -> list[str]:
    """Those of ``procs`` still running (a zombie has ended), as ``name(pid)``."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.name()}({proc.pid})")
    return alive


def checkpointed_rounds(out: Path) -> int:
    try:
        return len(json.loads((out / "checkpoint.json").read_text())["rounds"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def superlink_port(run: Running) -> int:
    """The port of the SuperLink that ``flwr run`` started for this run."""
    return int(run.match(r"Starting local SuperLink on 127\.0\.0\.1:(\d+)").group(1))


@pytest.mark.e2e
def test_ctrl_c_stops_a_flower_run_and_its_resume_command_finishes_it(tmp_path):
    out = tmp_path / "run"
    run = Running([*FLOWER_RUN, f"output_dir={out}"], tmp_path)
    run.wait_for(lambda: checkpointed_rounds(out) >= 1)
    port = superlink_port(run)
    assert port != DEFAULT_PORT  # a SuperLink of its own
    started = run.processes()
    assert any("flower-superlink" in " ".join(p.cmdline()) for p in started)
    assert any(p.name().startswith(("raylet", "ray::")) for p in started)

    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: fcil-run and flwr run both get it
    time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGINT)  # and again while it stops
    assert run.finish(timeout=90) == 130, run.output[-3000:]

    assert running(started) == [], run.output[-3000:]
    assert listening_process(port) is None and not superlink_running(port)
    rounds_done = checkpointed_rounds(out)
    assert 1 <= rounds_done < ROUNDS and not (out / "results.json").exists()
    last = run.output.strip().splitlines()[-1]
    expected = shlex.join(["fcil-run", *FLOWER_RUN, f"resume={out}"])
    assert last == f"fcil-run: interrupted; continue with: {expected}", run.output[-3000:]
    assert "Traceback" not in run.output

    command = shlex.split(last.split("continue with: ", 1)[1])
    resumed = subprocess.run([str(FCIL_RUN), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {out} after" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["round"]) for r in results["rounds"]] == [(t, r) for t in range(2) for r in range(5)]
    assert None not in results["accuracy_matrix"][1]


@pytest.mark.e2e
def test_a_superlink_on_the_default_port_is_not_joined_and_sigterm_stops_the_run(tmp_path):
    """Another checkout's SuperLink on port 39091: fcil-run starts its own, and leaves that one alone."""
    theirs = FlowerSite(tmp_path / "their-home", DEFAULT_PORT, free_port())
    theirs.home.mkdir()
    env = flower_env(theirs)
    ours_to_stop = None
    if listening_process(DEFAULT_PORT) is None:
        ours_to_stop = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(DEFAULT_PORT)],
            env=env, cwd=theirs.home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not superlink_running(DEFAULT_PORT):
            assert time.monotonic() < deadline, f"no SuperLink answers on {DEFAULT_PORT}"
            time.sleep(0.2)

        def their_runs() -> set[str]:
            listed = subprocess.run(["flwr", "list", "--format", "json"], env=env, cwd=theirs.home,
                                    capture_output=True, text=True, timeout=60)
            return {str(r["run-id"]) for r in json.loads(listed.stdout)["runs"]}

        before = their_runs()
        out = tmp_path / "run"
        run = Running([*SMALL, "rounds_per_task=2", "local_epochs=1", f"output_dir={out}"], tmp_path)
        run.wait_for(lambda: run.match(r"Successfully started run (\d+)"))
        port = superlink_port(run)
        run_id = run.match(r"Successfully started run (\d+)").group(1)
        started = run.processes()

        run.proc.send_signal(signal.SIGTERM)  # to fcil-run alone: it ends flwr run itself
        assert run.finish(timeout=90) == 143, run.output[-3000:]

        assert port != DEFAULT_PORT and run_id not in their_runs() and their_runs() == before
        assert superlink_running(DEFAULT_PORT)  # theirs is left running
        assert running(started) == [] and listening_process(port) is None
        assert not (out / "checkpoint.json").exists()
        last = run.output.strip().splitlines()[-1]
        expected = shlex.join(["fcil-run", *SMALL, "rounds_per_task=2", "local_epochs=1", f"output_dir={out}"])
        assert last == f"fcil-run: interrupted before its first checkpoint; start again with: {expected}"
    finally:
        if ours_to_stop is not None:
            stop_processes([psutil.Process(ours_to_stop.pid)])
            ours_to_stop.wait()


@pytest.mark.e2e
def test_ctrl_c_stops_an_inprocess_run_and_keeps_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL, "rounds_per_task=3", "local_epochs=1", "backend=inprocess", f"output_dir={out}"]
    run = Running(overrides, tmp_path)
    run.wait_for(lambda: checkpointed_rounds(out) >= 1)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.output[-3000:]
    assert "Traceback" not in run.output and not (out / "results.json").exists()
    assert 1 <= checkpointed_rounds(out) < 6
    last = run.output.strip().splitlines()[-1]
    assert last == f"fcil-run: interrupted; continue with: {shlex.join(['fcil-run', *overrides[:-1], f'resume={out}'])}"


@pytest.mark.e2e
def test_ctrl_c_stops_a_joint_run_without_a_traceback(tmp_path):
    """``joint`` writes no checkpoint: the line says how to start it again."""
    overrides = ["num_tasks=5", "train_per_class=40", "method=joint", "rounds_per_task=1", "local_epochs=2",
                 f"output_dir={tmp_path / 'run'}"]
    run = Running(overrides, tmp_path)
    run.wait_for(lambda: run.match(r"joint: \[task 1/5\]"))
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.output[-3000:]
    assert "Traceback" not in run.output
    assert run.output.strip().splitlines()[-1] == (
        f"fcil-run: interrupted before its first checkpoint; start again with: {shlex.join(['fcil-run', *overrides])}"
    )


def test_the_line_after_an_interruption(tmp_path):
    (tmp_path / "checkpoint.json").write_text("{}")
    prog = ["fcil-run", "--config-name", "other"]
    overrides = ["seed=1", f"output_dir={tmp_path}", "resume=/somewhere/else"]
    assert interrupted_line(prog, overrides, Interrupted(signal.SIGINT, tmp_path)) == (
        f"interrupted; continue with: fcil-run --config-name other seed=1 resume={tmp_path}"
    )
    assert interrupted_line(prog, ["seed=1"], Interrupted(signal.SIGTERM, tmp_path / "new")) == (
        "interrupted before its first checkpoint; start again with: fcil-run --config-name other seed=1"
    )
    spaced = tmp_path / "a b"
    spaced.mkdir()
    (spaced / "checkpoint.json").write_text("{}")
    line = interrupted_line(["fcil-run"], [], Interrupted(signal.SIGINT, spaced))
    assert shlex.split(line.split("continue with: ", 1)[1]) == ["fcil-run", f"resume='{spaced}'"]
    assert (Interrupted(signal.SIGINT).exit_code, Interrupted(signal.SIGTERM).exit_code) == (130, 143)


def test_a_sweep_job_goes_on_from_a_checkpoint_of_its_own_config(tmp_path):
    """fcil-sweep resumes a job whose checkpoint has its config, and then skips it: its results
    were written with ``resume`` set."""
    config = {"seed": 0, "lr": 0.003, "output_dir": str(tmp_path), "resume": None}
    assert not same_config(tmp_path / "checkpoint.json", config)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"config": {**config, "seed": 1}}))
    assert not same_config(tmp_path / "checkpoint.json", config)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"config": config}))
    assert same_config(tmp_path / "checkpoint.json", config)
    (tmp_path / "results.json").write_text(json.dumps({"config": {**config, "resume": str(tmp_path)}}))
    assert same_config(tmp_path / "results.json", config)
