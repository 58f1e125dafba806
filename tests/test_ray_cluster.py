"""One Flower simulation across a Ray cluster: ``fcil-run`` with ``RAY_ADDRESS`` joins an existing cluster.

The cluster is two Ray nodes on this machine (``ray start --block``, one CPU each, each with its own
temporary directory and free ports), addressed on loopback addresses only: Ray replaces 127.0.0.1 by
the machine's network address, so the head is 127.0.0.2 and the second node 127.0.0.3 (Linux routes
all of 127.0.0.0/8 to ``lo``). Ray's GCS and raylets still listen on every interface: Ray has no
option to bind them to one address.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from fedcil.cli.run import (
    FlowerSite, flower_env, free_port, launch, listening_process, stop_superlink, superlink_running,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="two Ray nodes on one machine need 127.0.0.0/8 on lo (Linux)"),
]

BIN = Path(sys.executable).parent
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
# 2 clients of 1 CPU each on 2 nodes of 1 CPU each: Flower's actor pool has one actor per node.
RUN = [
    "num_tasks=2", "rounds_per_task=1", "local_epochs=1", "num_clients=2", "partition=iid",
    "client_resources.num_cpus=1", "client_resources.num_gpus=0",
]
START_SECONDS = 120  # per node, on a busy 2-core machine
RUN_SECONDS = 400


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class RayNode:
    """A Ray node started by this test: its ``ray start --block`` process (the parent of all of
    the node's processes), temporary directory and output."""

    name: str
    ip: str
    temp_dir: Path
    log: Path
    proc: subprocess.Popen

    def processes(self) -> list[psutil.Process]:
        """The node's processes: ``ray start`` and its descendants (GCS, raylet, workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def logged_actors(self) -> set[str]:
        """Classes of the actors whose workers ran on this node, from the ``:actor_name:`` line
        Ray writes at the top of each worker's log in the node's own session directory."""
        names = set()
        for path in (self.temp_dir / "session_latest" / "logs").glob("worker-*.out"):
            for line in path.read_text(errors="replace").splitlines()[:5]:
                if line.startswith(":actor_name:"):
                    names.add(line.removeprefix(":actor_name:"))
        return names

    def output_tail(self) -> str:
        """The end of ``ray start``'s output, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class RayCluster:
    """A head and a second node; ``address`` is the head's GCS, as ``RAY_ADDRESS`` takes it."""

    address: str
    nodes: list[RayNode] = field(default_factory=list)


def start_node(name: str, ip: str, root: Path, logs: Path, head_args: list[str]) -> RayNode:
    """``ray start --block`` for one node with 1 CPU, the custom resource ``name`` and free ports.

    Returns once the node has written its ``ray_current_cluster`` file (it is up); fails the
    test, with Ray's output, if ``ray start`` exits first or takes longer than ``START_SECONDS``.
    """
    temp_dir = root / name
    temp_dir.mkdir()
    ports = {
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    command = [
        str(BIN / "ray"), "start", "--block", *head_args, f"--node-ip-address={ip}",
        "--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps({name: 1})}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "--min-worker-port=0", "--max-worker-port=0",  # workers on ports the OS picks
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = logs / f"ray-{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    node = RayNode(name, ip, temp_dir, log, proc)
    deadline = time.monotonic() + START_SECONDS
    while not (temp_dir / "ray_current_cluster").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(node)
            pytest.fail(f"ray start for {name} did not come up:\n{node.output_tail()}")
        time.sleep(0.5)
    return node


def stop_node(node: RayNode) -> None:
    """Stop one node by its pids: SIGTERM to ``ray start`` (which stops the node's processes),
    then SIGKILL to any of them still alive after bounded waits."""
    family = node.processes()
    with contextlib.suppress(ProcessLookupError):
        node.proc.terminate()
    try:
        node.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def alive_nodes(address: str) -> list[dict[str, float]]:
    """The resources of the cluster's alive nodes, once it has two, seen by a Ray driver in a
    child process (the test process never joins the cluster)."""
    probe = (
        "import json, sys, time, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "deadline = time.monotonic() + 60\n"
        "while True:\n"
        "    nodes = [n['Resources'] for n in ray.nodes() if n['Alive']]\n"
        "    if len(nodes) >= 2 or time.monotonic() > deadline:\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(nodes))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """A two-node Ray cluster on loopback addresses, stopped by pid (never ``ray stop``, which
    would stop every Ray instance on the machine) and checked gone afterwards.

    The nodes' temporary directories are short paths under /tmp: Ray's Unix sockets live there and
    a pytest ``tmp_path`` makes them longer than the 107 bytes a socket path may have. Ray's output
    goes to ``tmp_path``.
    """
    root = Path(tempfile.mkdtemp(prefix="fcil-ray-", dir="/tmp"))
    gcs_port = free_port()
    cluster = RayCluster(f"{HEAD_IP}:{gcs_port}")
    try:
        cluster.nodes.append(start_node("fcil_head", HEAD_IP, root, tmp_path, [
            "--head", f"--port={gcs_port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]))
        cluster.nodes.append(start_node("fcil_node", NODE_IP, root, tmp_path, [f"--address={cluster.address}"]))
        yield cluster
    finally:
        family = [p for node in cluster.nodes for p in node.processes()]
        for node in reversed(cluster.nodes):
            stop_node(node)
        shutil.rmtree(root, ignore_errors=True)
    assert not [p for p in family if p.is_running()], "Ray processes left running"


class ActorWatch(threading.Thread):
    """Samples every 0.1 s which Ray node runs a ``ClientAppActor.run`` task: Ray names a worker
    process ``ray::<actor class>.<method>`` while it executes that method."""

    def __init__(self, nodes: list[RayNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.ran: dict[str, set[int]] = {node.name: set() for node in nodes}  # node -> actor pids
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for node in self.nodes:
                for proc in node.processes():
                    with contextlib.suppress(psutil.Error):
                        if " ".join(proc.cmdline()).startswith("ray::ClientAppActor.run"):
                            self.ran[node.name].add(proc.pid)


def test_simulation_joins_an_existing_ray_cluster_through_ray_address(ray_cluster: RayCluster, tmp_path: Path):
    """``RAY_ADDRESS=<head>:<port> fcil-run ...``: Flower's simulation joins the cluster instead of
    starting its own Ray, its client actors train on both nodes, and the accuracies are those of
    the same config with ``backend=inprocess``."""
    nodes = alive_nodes(ray_cluster.address)
    assert sorted(name for n in nodes for name in n if name.startswith("fcil_")) == ["fcil_head", "fcil_node"]
    assert [n["CPU"] for n in nodes] == [1.0, 1.0]

    site = FlowerSite.isolated(tmp_path / "flwr-home")
    env = {**flower_env(site), "RAY_ADDRESS": ray_cluster.address}  # a SuperLink of this test's own
    out, log = tmp_path / "flower", tmp_path / "fcil-run.log"
    watch = ActorWatch(ray_cluster.nodes)
    watch.start()
    try:
        with log.open("w") as output:
            done = subprocess.run(
                [str(BIN / "fcil-run"), *RUN, f"output_dir={out}"], env=env, cwd=tmp_path,
                stdout=output, stderr=subprocess.STDOUT, timeout=RUN_SECONDS,
            )
    finally:
        watch.done.set()
        watch.join(timeout=10)
        stop_superlink(site.port)  # left running only by a failed or timed-out run
    assert done.returncode == 0, log.read_text(errors="replace")[-5000:]
    assert not superlink_running(site.port) and listening_process(site.port) is None

    # A client actor on each node (its worker's log is in that node's own directory) ...
    for node in ray_cluster.nodes:
        assert "ClientAppActor" in node.logged_actors(), node.name
    # ... and each ran Flower's ClientApp: the actor processes are children of our raylets,
    # so the simulation joined this cluster rather than starting a Ray of its own.
    assert all(watch.ran.values()), watch.ran

    flower = json.loads((out / "results.json").read_text())
    local = json.loads((launch("config", [*RUN, "backend=inprocess", f"output_dir={tmp_path / 'local'}"])
                        / "results.json").read_text())
    assert [r["clients"] for r in flower["rounds"]] == [2, 2]
    assert len(flower["accuracy_matrix"]) == 2 and None not in flower["accuracy_matrix"][1]
    assert flower["accuracy_matrix"] == local["accuracy_matrix"]
