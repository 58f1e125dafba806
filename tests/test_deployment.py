"""A real deployment as plain processes: SuperLink with TLS and a state database, 3 SuperNodes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, RecordDict

from client_app.node import node_overrides
from fedcil.cli.run import APP_DIR, free_port, launch, listening_process

pytestmark = pytest.mark.e2e

DEPLOY = APP_DIR / "scripts" / "deploy_local.sh"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["num_tasks=2", "rounds_per_task=2", "num_clients=3", "local_epochs=3", "partition=iid"]


def test_tls_deployment_with_supernode_auth_and_secure_aggregation_matches_the_loop_and_leaves_no_process(tmp_path):
    """Secure aggregation on (four exchanges a round, client state kept between them by the
    SuperNodes); the accuracies are those of the plain in-process loop within 1 point per entry."""
    work = tmp_path / "deploy"
    out = subprocess.run(
        ["bash", str(DEPLOY), "-n", "3", "-a", "-w", str(work), *TINY, "secagg.enabled=true", "replies.weighting=claimed", "replies.update_factor=null"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "finished:completed" in out.stdout
    results = json.loads((work / "results" / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [3, 3, 3, 3]
    assert all(r["bytes_up"] > 0 and not r["missing"] for r in results["rounds"])
    assert [r["authenticated_keys"] for r in results["rounds"]] == [3, 3, 3, 3]  # signed with the SuperNode keys
    local = json.loads((launch("config", [*TINY, "backend=inprocess", f"output_dir={tmp_path / 'local'}"]) / "results.json").read_text())
    pairs = zip(sum(results["accuracy_matrix"], []), sum(local["accuracy_matrix"], []))
    assert all((a is None and b is None) or abs(a - b) <= 1.0 for a, b in pairs)

    assert "Uvicorn running on https://127.0.0.1" in (work / "superlink.log").read_text()  # TLS on
    assert all(json.loads((work / f"register-{i}.json").read_text())["success"] for i in range(3))
    assert (work / "state.db").stat().st_size > 0
    pids = [int(line.split()[1]) for line in (work / "pids").read_text().splitlines()]
    ports = [int(line.split()[1]) for line in (work / "ports").read_text().splitlines()]
    assert len(pids) == 2 + 2 * 3 and len(ports) == 4  # SuperLink and its SuperExec, and per node the same
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert all(listening_process(port) is None for port in ports)
    # executor authentication was on (process isolation) and every SuperExec proved its node's secret
    logs = "".join(log.read_text() for log in work.glob("*.log"))
    assert "ignored in subprocess isolation mode" not in logs and "SuperExec authentication failed" not in logs
    assert sorted(s.name for s in (work / "secrets").iterdir()) == [".gitignore", "superlink", "supernode-0", "supernode-1", "supernode-2"]
    assert all((work / "secrets" / s).stat().st_mode & 0o777 == 0o600 for s in ("superlink", "supernode-0"))
    # every node answered its 4 training messages through one warm worker, which left with the node;
    # the ClientApps run under the node's SuperExec, so their output is in its log
    assert [(work / f"clientapp-{i}.log").read_text().count("started this node's warm worker") for i in range(3)] == [1, 1, 1]
    assert not processes_of(work), "a process of the deployment outlived it"


def processes_of(work: Path, wait: float = 10.0) -> list[psutil.Process]:
    """The live processes whose FLWR_HOME is the deployment's (after waiting up to ``wait`` s for them to go)."""
    home, deadline = str(work / "flwr-home"), time.monotonic() + wait
    while True:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("FLWR_HOME") == home and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_supernode_killed_mid_run_is_survived_and_recorded(tmp_path):
    """SIGKILL one SuperNode (and its SuperExec and ClientApp) after the first round: the others finish the run."""
    work = tmp_path / "deploy"
    # Generous timeout: a round here takes about 20 s on 2 cores (Flower's processes and waits; see docs/deployment.md).
    overrides = ["num_tasks=2", "rounds_per_task=1", "num_clients=3", "local_epochs=1", "round_timeout=60", "min_replies=2"]
    proc = subprocess.Popen(["bash", str(DEPLOY), "-n", "3", "-w", str(work), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        for line in proc.stdout:
            if victim is None and "[task 1/2 round 1/1]" in line:
                started = dict(r.split() for r in (work / "pids").read_text().splitlines())
                victim = [psutil.Process(int(started[name])) for name in ("supernode-2", "clientapp-2")]
                for member in [m for node in victim for m in (*node.children(recursive=True), node)]:
                    member.kill()
        proc.wait(timeout=900)
    finally:
        proc.kill()
    assert victim is not None and proc.returncode == 0
    rounds = json.loads((work / "results" / "results.json").read_text())["rounds"]
    assert rounds[0]["clients"] == 3 and not rounds[0]["missing"]
    assert rounds[1]["clients"] == 2 and len(rounds[1]["missing"]) == 1


@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_a_server_without_data_evaluates_on_the_supernodes(tmp_path):
    """evaluation=clients: the server's dataset root does not exist; each SuperNode reads its data-dir."""
    work = tmp_path / "deploy"
    run = ["dataset=fashion_mnist", "train_per_class=100", "test_per_class=60", "num_tasks=2", "rounds_per_task=1",
           "num_clients=3", "local_epochs=1", "partition=iid"]
    out = subprocess.run(
        ["bash", str(DEPLOY), "-n", "3", "-w", str(work), "-d", str(FMNIST), *run, "evaluation=clients",
         "dataset.root=/nonexistent"], capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deployed = json.loads((work / "results" / "results.json").read_text())
    local = json.loads((launch("config", [*run, "backend=inprocess", f"output_dir={tmp_path / 'local'}"]) / "results.json").read_text())
    assert deployed["config"]["dataset"]["root"] == "/nonexistent"
    assert deployed["accuracy_matrix"] == local["accuracy_matrix"]


def test_bad_node_count_is_refused_before_anything_starts(tmp_path):
    out = subprocess.run(["bash", str(DEPLOY), "-n", "0", "-w", str(tmp_path / "w")], capture_output=True, text=True)
    assert out.returncode == 2 and "-n 0 is not a positive number of SuperNodes" in out.stderr
    assert not (tmp_path / "w").exists()


def test_a_supernode_data_dir_becomes_its_dataset_root_and_its_partitions_the_client_count():
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3, "data-dir": "/data/node 0"},
        state=RecordDict(), run_config={"config-name": "config", "overrides": "dataset=fashion_mnist seed=3"},
    )
    assert node_overrides(context) == ["dataset=fashion_mnist", "seed=3", "num_clients=3", "dataset.root='/data/node 0'"]


def test_a_run_that_chooses_num_clients_keeps_it_whatever_the_node_config_says():
    for chosen in ("num_clients=5", "experiment=fmnist_ssl"):  # the preset sets num_clients=10
        context = Context(
            run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(), run_config={"config-name": "config", "overrides": chosen},
        )
        assert node_overrides(context) == [chosen]


def test_a_supernode_with_an_unregistered_key_is_refused(tmp_path):
    """--enable-supernode-auth: a SuperNode whose public key was never registered cannot join."""
    certs, key, log = tmp_path / "certs", tmp_path / "rogue", tmp_path / "rogue.log"
    subprocess.run(["bash", str(APP_DIR / "docker" / "certs.sh"), str(certs)], check=True, capture_output=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(key)], check=True)
    port, node_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0"}  # they start flower-superexec
    # Each in its own process group: both start a flower-superexec, stopped with them.
    link = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
         "--ssl-keyfile", str(certs / "server.key"), "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port),
         "--enable-supernode-auth"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    rogue = None
    try:
        deadline = time.monotonic() + 60
        while listening_process(port) is None and time.monotonic() < deadline:
            assert link.poll() is None, "the SuperLink exited"
            time.sleep(0.5)
        with log.open("w") as out:
            rogue = subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"), "--superlink", f"127.0.0.1:{port}",
                 "--port", str(node_port), "--auth-supernode-private-key", str(key)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            code = rogue.wait(timeout=60)
    finally:
        for proc in (rogue, link):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code != 0
    assert "Failed to activate SuperNode" in log.read_text()
