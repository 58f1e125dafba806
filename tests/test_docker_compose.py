"""The docker compose deployment run for real: own dockerd, locally built images, TLS, SuperNode and executor auth.

The test starts its own Docker daemon (no bridge, no iptables, its own socket and data root),
builds the base image from debootstrap (docker/base_image.sh) and the project image on it,
brings up docker/compose.yml with the TLS, both authentication and host-network overlays on
127.0.0.1, registers the SuperNodes' keys, submits `flwr run` (secure aggregation, its keys
signed with the SuperNode keys), checks the run and its results,
and takes everything down: the stack, the daemon (by its pid) and its data root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedcil.cli.run import APP_DIR, free_port

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
COMPOSE = ["compose.yml", "compose.host.yml", "compose.tls.yml", "compose.auth.yml", "compose.superexec-auth.yml"]
RUN = "num_clients=2 dataset=fashion_mnist train_per_class=100 test_per_class=60 num_tasks=2 rounds_per_task=1 " \
      "local_epochs=1 partition=iid evaluation=clients output_dir=/results/run1 " \
      "secagg.enabled=true replies.weighting=claimed replies.update_factor=null"


def missing_requirement() -> str | None:
    """Why this machine cannot run the test, or None."""
    tools = [t for t in ("dockerd", "docker", "docker-compose", "debootstrap", "ssh-keygen") if shutil.which(t) is None]
    if tools:
        return f"not installed: {', '.join(tools)} (apt-get install docker.io docker-compose debootstrap)"
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root"
    if not FMNIST.is_dir():
        return "apt-get install dataset-fashion-mnist"
    return None


def sh(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def wait_until(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Dockerd:
    """A Docker daemon of the test's own, on a containerd of its own; both stopped by their pids.

    dockerd gives a containerd it starts itself 15 s to answer, which a cold, busy machine can
    miss; starting containerd first lets the test wait as long as it needs.
    """

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True)
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.procs: list[subprocess.Popen] = []
        containerd_socket = root / "exec" / "containerd.sock"
        config = root / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{root / "data" / "containerd"}"\nstate = "{root / "exec" / "containerd"}"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{containerd_socket}"\n'
        )
        try:
            self.start(["containerd", f"--config={config}"])
            wait_until(lambda: self.answers(["ctr", f"--address={containerd_socket}", "version"]), "containerd", 120)
            self.start(["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", f"--data-root={root / 'data'}",
                        f"--exec-root={root / 'exec'}", f"--pidfile={root / 'dockerd.pid'}", f"--host=unix://{self.socket}",
                        f"--containerd={containerd_socket}"])
            wait_until(lambda: self.answers(["docker", "info"]), "dockerd", 120)
        except BaseException:
            self.stop()
            raise

    def start(self, cmd: list[str]) -> None:
        with self.log.open("a") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def answers(self, cmd: list[str]) -> bool:
        """Whether `cmd` succeeds; fails the test at once if a daemon has exited."""
        for proc in self.procs:
            assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}"
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def stop(self) -> None:
        for proc in reversed(self.procs):  # dockerd before its containerd
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # dockerd leaves its data root and network namespace mounted under the test's root.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m == str(self.root) or m.startswith(f"{self.root}/")), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))
def test_compose_stack_with_tls_and_supernode_auth_runs_to_completion(tmp_path):
    started = time.monotonic()
    # The daemon's data root (images of several GB) lives outside pytest's kept tmp folders.
    daemon = Dockerd(Path("/var/tmp") / f"fcil-dockerd-{os.getpid()}")
    project = f"fcil{os.getpid()}"
    ports = {"SUPERLINK_PORT": free_port(), "NODE_PORT_0": free_port(), "NODE_PORT_1": free_port()}
    for sub in ("results", "server-data", "flwr-home"):
        (tmp_path / sub).mkdir()
    env = {
        **daemon.env, **{k: str(v) for k, v in ports.items()}, "BIND_ADDRESS": "127.0.0.1",
        "CERTS_DIR": str(tmp_path / "certs"), "KEYS_DIR": str(tmp_path / "keys"), "SECRETS_DIR": str(tmp_path / "secrets"), "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_DATA_DIR": str(tmp_path / "server-data"), "DATA_DIR_0": str(FMNIST), "DATA_DIR_1": str(FMNIST),
        "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    compose = ["docker-compose", "-p", project, *[a for f in COMPOSE for a in ("-f", str(APP_DIR / "docker" / f))]]
    try:
        sh(["bash", str(APP_DIR / "docker" / "base_image.sh"), "fcil-test-base:1"], env, 900)
        sh(["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg", "BASE_IMAGE=fcil-test-base:1",
            "-t", "fedcil-lora:0.1.0", "."], env, 1200, cwd=APP_DIR)
        built = time.monotonic()
        sh(["bash", str(APP_DIR / "docker" / "certs.sh"), str(tmp_path / "certs")], env, 60)
        sh(["bash", str(APP_DIR / "docker" / "secrets.sh"), str(tmp_path / "secrets")], env, 60)
        (tmp_path / "keys").mkdir()
        for i in (0, 1):
            sh(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(tmp_path / "keys" / f"supernode-{i}")], env, 30)
        (tmp_path / "keys" / "trusted.pub").write_text("".join((tmp_path / "keys" / f"supernode-{i}.pub").read_text() for i in (0, 1)))
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "docker"\n\n[superlink.docker]\naddress = "127.0.0.1:{ports["SUPERLINK_PORT"]}"\n'
            f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"\n'
        )

        sh([*compose, "up", "-d", "superlink", "serverapp"], env, 300)
        health = f"https://127.0.0.1:{ports['SUPERLINK_PORT']}/health"
        ca = str(tmp_path / "certs" / "ca.crt")
        wait_until(lambda: reachable(health, ca), "the SuperLink over TLS", 120)
        for i in (0, 1):
            reply = json.loads(sh(["flwr", "supernode", "register", str(tmp_path / "keys" / f"supernode-{i}.pub"), "docker",
                                   "--format", "json"], env, 120, cwd=tmp_path))
            assert reply["success"], reply
        sh([*compose, "up", "-d"], env, 300)

        (tmp_path / "run.toml").write_text(f'config-name = "config"\noverrides = "{RUN}"\n')
        run = sh(["flwr", "run", str(APP_DIR), "docker", "--stream", "--run-config", str(tmp_path / "run.toml")],
                 env, 1200, cwd=tmp_path)
        run_id = run.split("Successfully started run ")[1].split()[0]
        listing = json.loads(sh(["flwr", "list", "--run-id", run_id, "--format", "json"], env, 120, cwd=tmp_path))
        assert listing["runs"][0]["status"] == "finished:completed", run[-3000:]

        results = json.loads((tmp_path / "results" / "run1" / "results.json").read_text())
        assert [r["clients"] for r in results["rounds"]] == [2, 2]
        assert all(not r["missing"] and r["bytes_up"] > 0 for r in results["rounds"])
        assert [r["authenticated_keys"] for r in results["rounds"]] == [2, 2]  # secure sums of keys signed by the SuperNode keys
        assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix"][1][1] > 0
        assert results["config"]["evaluation"] == "clients"
        logs = sh([*compose, "logs", "--no-color", "superlink"], env, 120)
        assert "Uvicorn running on https://127.0.0.1" in logs  # TLS on, loopback only
        logs += sh([*compose, "logs", "--no-color", "supernode-0", "supernode-1"], env, 120)
        assert "ignored in subprocess isolation mode" not in logs and "authentication failed" not in logs
        assert "superexec-auth-secret-file=/secrets/superexec-auth" in sh([*compose, "config"], env, 120)
        print(f"\ncompose run: images built in {built - started:.0f} s, stack and run {time.monotonic() - built:.0f} s")
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "10"], env=env, capture_output=True, timeout=300)
        daemon.stop()
    assert not Path(daemon.root).exists()


def reachable(url: str, ca: str) -> bool:
    try:
        return httpx.get(url, verify=ssl.create_default_context(cafile=ca), timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
