"""The apps import light, and a SuperNode's warm worker answers exactly as the ClientApp would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from client_app.local_round import answer
from client_app.node import NodeJob
from client_app.worker import WorkerError, ask, runtime_dir, worker_base
from fedcil.config import compose_config
from fedcil.shapes import declared_shape
from fedcil.errors import ConfigError
from fedcil.model import model_for
from fedcil.protocol import encode_request
from fedcil.tasks import split_for
from strategies import build_strategy

HEAVY = ["torch", "timm", "peft", "transformers", "torchvision", "ray", "sklearn", "matplotlib"]
TINY = ("num_clients=3", "num_tasks=2", "rounds_per_task=1", "local_epochs=1", "partition=iid")


def test_the_apps_and_launchers_import_without_the_heavy_stack():
    """What Flower imports to load the apps, and fcil-run / fcil-sweep before they start Flower:
    no torch, timm, PEFT, transformers or Ray."""
    modules = "client_app.app, server_app.app, fedcil.cli.run, fedcil.cli.sweep"
    code = f"import json, sys, {modules}; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert not [m for m in HEAVY if m in loaded]
    assert "client_app.node" in loaded and "client_app.local_round" not in loaded and "server_app.loop" not in loaded


def request_content():
    """The first train request of LoRM on the tiny config, as the server sends it."""
    cfg = compose_config("config", list(TINY))
    shape = declared_shape(cfg.dataset)
    model = model_for(cfg, shape.num_classes, shape.in_chans, shape.image_size)
    strategy = build_strategy(cfg, split_for(cfg, shape.num_classes), model.initial_state)
    strategy.start_task(0)
    return encode_request(strategy.configure_round(0, 0), 0, 0)


def arrays(content) -> dict[str, np.ndarray]:
    """Every array of a reply, and its metrics and configs as one-element arrays, by name."""
    named = {f"{r}/{k}": content.array_records[r][k].numpy() for r in content.array_records for k in content.array_records[r]}
    for records in (content.metric_records, content.config_records):
        named.update({f"{r}/{k}": np.asarray(v) for r in records for k, v in records[r].items()})
    return named


def worker_pids(base: Path) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(base) in " ".join(p.info["cmdline"] or [])]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A TMPDIR of the test's own, so that its workers meet no other."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_warm_worker_answers_like_the_clientapp_is_reused_replaced_and_leaves_with_its_superexec(private_tmp):
    content, job = request_content(), NodeJob("config", TINY, 1, 3)
    superexec = subprocess.Popen(["sleep", "600"])  # stands in for the SuperExec the worker watches
    base = worker_base(node_id=7, watch_pid=superexec.pid)
    try:
        first = ask(job, content, node_id=7, watch_pid=superexec.pid)
        [pid] = worker_pids(base)
        again = ask(job, content, node_id=7, watch_pid=superexec.pid)
        assert worker_pids(base) == [pid]  # the same process answered twice
        local = arrays(answer(job, content))
        for reply in (first, again):
            got = arrays(reply)
            assert got.keys() == local.keys() and all(np.array_equal(got[k], local[k]) for k in local)

        with pytest.raises(ConfigError, match=r"^node config partition-id=5 outside 0\.\.2$"):
            ask(NodeJob("config", TINY, 5, 3), content, node_id=7, watch_pid=superexec.pid)
        assert worker_pids(base) == [pid]  # a client error does not end the worker

        victim = psutil.Process(pid)
        victim.send_signal(signal.SIGKILL)  # a worker that died is replaced on the next request
        victim.wait(10)
        replaced = arrays(ask(job, content, node_id=7, watch_pid=superexec.pid))
        assert replaced.keys() == local.keys() and all(np.array_equal(replaced[k], local[k]) for k in local)
        [new_pid] = worker_pids(base)
        assert new_pid != pid
    finally:
        superexec.kill()
        superexec.wait()
    deadline = time.monotonic() + 15
    while worker_pids(base) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker_pids(base)  # it left with the process it watched
    assert not Path(f"{base}.sock").exists() and Path(f"{base}.log").read_text().count("listening on") == 2


def test_a_runtime_directory_others_can_open_is_refused(private_tmp):
    shared = private_tmp / f"fedcil-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(WorkerError, match="must belong to uid .* with mode 0700 .*mode 777"):
        runtime_dir()
    shared.chmod(0o700)
    assert runtime_dir() == shared
