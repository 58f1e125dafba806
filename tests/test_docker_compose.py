"""The docker compose deployment run for real: own dockerd, locally built images, server and site stacks.

The test starts its own Docker daemon (no bridge, no iptables, its own socket and data root),
builds the base image from debootstrap (docker/base_image.sh) and the project image on it,
and lays out what each host holds: the operator's folder (the CA, the SuperLink's certificate
for 127.0.0.2 and its secret) and one folder per site (its exported data only, ca.crt, its own
key pair and executor secret). It brings up the server stack (docker/compose.server.yml) on
127.0.0.2 and two site stacks (docker/compose.site.yml, each its own compose project) that dial
SUPERLINK_ADDRESS=127.0.0.2:PORT, all with the host-network, TLS, SuperNode-auth and
executor-auth overlays; registers the sites' keys, submits `flwr run` (secure aggregation,
its keys signed with the SuperNode keys), checks the run and its results, that no process in
any container runs as root and that no container has ca.key, and takes everything down: the
stacks, their containers, volumes and networks, the daemon (by its pid) and its run folder.

The daemon's image store (its data root) persists between runs in
``$FCIL_DOCKER_TEST_CACHE`` (default ``${XDG_CACHE_HOME:-~/.cache}/fedcil-lora/docker-test``),
locked by one run at a time (a second run waits, then falls back to a private store): the
project image is built every run, from docker's layer cache when its inputs are unchanged, and
base_image.sh runs only when no base image is tagged with the hash of base_image.sh and the flwr
pin. After the build, every image but these two is removed, so the store holds one version of
each. Where the cache cannot be used (not writable, overlay2 fails there, another daemon holds
it) the store is a per-run folder, deleted at the end with the rest. Delete the cache folder to
build from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fedcil.cli.run import APP_DIR, free_ports

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
OVERLAYS = ["host", "tls", "auth", "superexec-auth"]
SERVER_IP = "127.0.0.2"  # the SuperLink's address, named by its certificate only through certs.sh's SAN argument
APP_UID = 49999  # the image's user, `app`
IMAGE = "fedcil-lora:0.1.0"
CACHE_ENV = "FCIL_DOCKER_TEST_CACHE"
LOCK_WAIT = 1200  # seconds a run waits for another run's hold on the cache before using a store of its own
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

    Everything of the run (sockets, exec root, containerd's state, log) lies under ``root``,
    removed at stop; the images lie under ``data_root``, which may be outside it and then stays.
    The pid file lies next to ``data_root``: dockerd refuses a data root whose pid file names a
    running process (a daemon orphaned by a killed run). dockerd gives a containerd it starts
    itself 15 s to answer, which a cold, busy machine can miss; starting containerd first lets
    the test wait as long as it needs.
    """

    def __init__(self, root: Path, data_root: Path, storage_driver: str | None = None):
        self.root, self.data_root = root, data_root
        pidfile = data_root.with_name("dockerd.pid")
        pid = pidfile.read_text().strip() if pidfile.exists() else ""
        assert not (pid.isdigit() and Path(f"/proc/{pid}").exists()), f"dockerd {pid} runs on {data_root}"
        root.mkdir(parents=True)
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.procs: list[subprocess.Popen] = []
        containerd_socket = root / "exec" / "containerd.sock"
        config = root / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{root / "containerd"}"\nstate = "{root / "exec" / "containerd"}"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{containerd_socket}"\n'
        )
        driver = [f"--storage-driver={storage_driver}"] if storage_driver else []
        try:
            data_root.mkdir(parents=True, exist_ok=True)
            self.start(["containerd", f"--config={config}"])
            wait_until(lambda: self.answers(["ctr", f"--address={containerd_socket}", "version"]), "containerd", 120)
            self.start(["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", f"--data-root={data_root}",
                        f"--exec-root={root / 'exec'}", f"--pidfile={pidfile}",
                        f"--host=unix://{self.socket}", f"--containerd={containerd_socket}", *driver])
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
        # dockerd leaves its data root, its exec root and network namespaces mounted.
        for mount in sorted(mounts_under(self.root, self.data_root), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def mounts_under(*roots: Path) -> list[str]:
    """The mount points at or below any of ``roots``."""
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [m for m in points if any(m == str(r) or m.startswith(f"{r}/") for r in roots)]


def cache_dir() -> Path:
    """The folder that keeps the test daemon's image store between runs."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedcil-lora" / "docker-test"


def locked_cache(stack: contextlib.ExitStack) -> Path | None:
    """The persistent data root, locked for this run until ``stack`` closes; None where the cache
    folder is unusable or another run holds it for longer than LOCK_WAIT."""
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = stack.enter_context((cache / "lock").open("a"))
    except OSError as err:
        print(f"docker test cache {cache} unusable ({err}): images go to a per-run data root")
        return None
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return cache / "data"
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"docker test cache {cache} still held by another run: images go to a per-run data root")
                return None
            time.sleep(2)


@contextlib.contextmanager
def own_daemon() -> Iterator[Dockerd]:
    """The test's Dockerd on the cached image store where it can be used, else on a per-run one;
    no container, volume or network of an earlier, killed run; all of them removed at the end."""
    # The run's folders (and a per-run store of several GB) live outside pytest's kept tmp folders.
    root = Path("/var/tmp") / f"fcil-dockerd-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        daemon = None
        if (cached := locked_cache(stack)) is not None:
            try:
                daemon = Dockerd(root, cached, storage_driver="overlay2")
            except AssertionError as err:  # the daemon exited: no overlay2 there, or its pid file names a live daemon
                print(f"dockerd on the cached data root {cached} failed, using a per-run one: {str(err)[-500:]}")
        if daemon is None:
            daemon = Dockerd(root, root / "data")
        try:
            remove_containers(daemon.env)
            yield daemon
        finally:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                remove_containers(daemon.env)
            daemon.stop()


def remove_containers(env: dict[str, str]) -> None:
    """Remove every container, volume and unused network of the daemon."""
    if containers := sh(["docker", "ps", "-aq"], env, 60).split():
        sh(["docker", "rm", "-f", "-v", *containers], env, 300)
    if volumes := sh(["docker", "volume", "ls", "-q"], env, 60).split():
        sh(["docker", "volume", "rm", "-f", *volumes], env, 300)
    sh(["docker", "network", "prune", "-f"], env, 60)


def base_image_tag() -> str:
    """The local base image's tag: a hash of what base_image.sh builds it from (itself, the flwr pin)."""
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr["))
    digest = hashlib.sha256((APP_DIR / "docker" / "base_image.sh").read_bytes() + pin.encode())
    return f"fcil-test-base:{digest.hexdigest()[:16]}"


def build_images(env: dict[str, str]) -> None:
    """The base image (base_image.sh, unless its tag exists) and the project image on it (docker build,
    every run, from cached layers where its inputs are unchanged); then every other image is removed."""
    base = base_image_tag()
    if subprocess.run(["docker", "image", "inspect", base], env=env, capture_output=True).returncode != 0:
        sh(["bash", str(APP_DIR / "docker" / "base_image.sh"), base], env, 900)
    sh(["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={base}",
        "-t", IMAGE, "."], env, 1200, cwd=APP_DIR)
    tags = sh(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], env, 60).split()
    if stale := [t for t in tags if t not in (base, IMAGE) and "<none>" not in t]:
        sh(["docker", "rmi", *stale], env, 300)
    sh(["docker", "image", "prune", "-f"], env, 300)  # the untagged images of earlier inputs
    sh(["docker", "builder", "prune", "-f"], env, 300)  # BuildKit's cache, where docker build uses it


@pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))
def test_server_and_site_stacks_with_tls_and_supernode_auth_run_to_completion_unprivileged(tmp_path):
    started = time.monotonic()
    with own_daemon() as daemon:
        run_stacks(daemon, tmp_path, started)
    assert not daemon.root.exists() and not mounts_under(daemon.root, daemon.data_root)
    if not daemon.data_root.is_relative_to(daemon.root):
        assert daemon.data_root.is_dir()  # the cached image store stays


def run_stacks(daemon: Dockerd, tmp_path: Path, started: float) -> None:
    """Build the images, lay out the hosts' folders, run the stacks and check them; take the stacks down."""
    port, *node_ports = free_ports(3)
    address = f"{SERVER_IP}:{port}"
    server, sites = tmp_path / "server", [tmp_path / f"site-{i}" for i in (0, 1)]
    env = {**daemon.env, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    server_env = {**env, "SUPERLINK_PORT": str(port), "BIND_ADDRESS": SERVER_IP, "CERTS_DIR": str(server / "certs"),
                  "SECRETS_DIR": str(server / "secrets"), "RESULTS_DIR": str(server / "results"),
                  "SERVER_DATA_DIR": str(server / "data")}
    site_envs = [{**env, "SUPERLINK_ADDRESS": address, "BIND_ADDRESS": "127.0.0.1", "NODE_PORT": str(node_ports[i]),
                  "PARTITION_ID": str(i), "NUM_PARTITIONS": "2", "NODE_DATA": "local", "DATA_DIR": str(site / "data"),
                  "CERTS_DIR": str(site / "certs"), "KEYS_DIR": str(site / "keys"), "SECRETS_DIR": str(site / "secrets")}
                 for i, site in enumerate(sites)]
    stacks = [(compose("server", f"fcil{os.getpid()}-server"), server_env),
              *[(compose("site", f"fcil{os.getpid()}-site{i}"), site_env) for i, site_env in enumerate(site_envs)]]
    try:
        build_images(env)
        built = time.monotonic()
        # The operator: the CA and the SuperLink's certificate for the address the sites dial, its secret.
        sh(["bash", str(APP_DIR / "docker" / "certs.sh"), str(server / "certs"), f"IP:{SERVER_IP}"], env, 60)
        sh(["bash", str(APP_DIR / "docker" / "secrets.sh"), str(server / "secrets"), "superlink"], env, 60)
        for sub in ("results", "data"):
            (server / sub).mkdir()
        # Each site: its own data only, ca.crt, its own key pair and executor secret.
        sh([str(BIN / "fcil-export-sites"), "--out", str(tmp_path / "exported"), *RUN.split(), f"dataset.root={FMNIST}"],
           env, 300)
        for i, site in enumerate(sites):
            site.mkdir()
            (tmp_path / "exported" / f"site-{i}").rename(site / "data")
            (site / "certs").mkdir()
            shutil.copy(server / "certs" / "ca.crt", site / "certs")
            (site / "keys").mkdir()
            sh(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(site / "keys" / f"supernode-{i}")], env, 30)
            sh(["bash", str(APP_DIR / "docker" / "secrets.sh"), str(site / "secrets"), f"supernode-{i}"], env, 60)
        trusted = "".join((site / "keys" / f"supernode-{i}.pub").read_text() for i, site in enumerate(sites))
        for site in sites:
            (site / "keys" / "trusted.pub").write_text(trusted)
        # The containers run as uid 49999: it must read the private files mounted into them and write the results.
        for path in [server / "certs" / "server.key", server / "secrets" / "superlink", server / "results",
                     *[p for i, site in enumerate(sites) for p in (site / "keys" / f"supernode-{i}", site / "secrets" / f"supernode-{i}")]]:
            os.chown(path, APP_UID, APP_UID)
        (tmp_path / "flwr-home").mkdir()
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "docker"\n\n[superlink.docker]\naddress = "{address}"\n'
            f'root-certificates = "{server / "certs" / "ca.crt"}"\n'
        )

        (server_compose, _), site_stacks = stacks[0], stacks[1:]
        sh([*server_compose, "up", "-d"], server_env, 300)
        wait_until(lambda: reachable(f"https://{address}/health", str(server / "certs" / "ca.crt")), "the SuperLink over TLS", 120)
        for i, site in enumerate(sites):
            reply = json.loads(sh(["flwr", "supernode", "register", str(site / "keys" / f"supernode-{i}.pub"), "docker",
                                   "--format", "json"], env, 120, cwd=tmp_path))
            assert reply["success"], reply
        for site_compose, site_env in site_stacks:
            sh([*site_compose, "up", "-d"], site_env, 300)

        (tmp_path / "run.toml").write_text(f'config-name = "config"\noverrides = "{RUN}"\n')
        run = sh(["flwr", "run", str(APP_DIR), "docker", "--stream", "--run-config", str(tmp_path / "run.toml")],
                 env, 1200, cwd=tmp_path)
        run_id = run.split("Successfully started run ")[1].split()[0]
        listing = json.loads(sh(["flwr", "list", "--run-id", run_id, "--format", "json"], env, 120, cwd=tmp_path))
        assert listing["runs"][0]["status"] == "finished:completed", run[-3000:]

        results = json.loads((server / "results" / "run1" / "results.json").read_text())
        assert [r["clients"] for r in results["rounds"]] == [2, 2]
        assert all(not r["missing"] and r["bytes_up"] > 0 for r in results["rounds"])
        assert [r["authenticated_keys"] for r in results["rounds"]] == [2, 2]  # secure sums of keys signed by the SuperNode keys
        assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix"][1][1] > 0
        assert results["config"]["evaluation"] == "clients"
        logs = sh([*server_compose, "logs", "--no-color", "superlink"], server_env, 120)
        assert f"Uvicorn running on https://{SERVER_IP}" in logs  # TLS on, on the address the certificate names
        for site_compose, site_env in site_stacks:
            logs = sh([*site_compose, "logs", "--no-color"], site_env, 120)
            assert "ignored in subprocess isolation mode" not in logs and "authentication failed" not in logs
            assert "superexec-auth-secret-file=/secrets/superexec-auth" in sh([*site_compose, "config"], site_env, 120)
        check_least_privilege(stacks, server / "certs")
        print(f"\ncompose run: images built in {built - started:.0f} s, stacks and run {time.monotonic() - built:.0f} s")
    finally:
        for cmd, stack_env in reversed(stacks):
            subprocess.run([*cmd, "down", "-v", "--timeout", "10"], env=stack_env, capture_output=True, timeout=300)


def compose(stack: str, project: str) -> list[str]:
    """The docker-compose command line of ``stack`` (server or site) with every overlay of this test, as ``project``."""
    files = [f"compose.{stack}.yml", *(f"compose.{stack}.{overlay}.yml" for overlay in OVERLAYS)]
    return ["docker-compose", "-p", project, *[a for f in files for a in ("-f", str(APP_DIR / "docker" / f))]]


def check_least_privilege(stacks: list[tuple[list[str], dict[str, str]]], certs: Path) -> None:
    """In every running container: no process runs as root, the ClientApps' warm workers (the app's
    code) among them; ca.key is neither mounted nor present; server.key is the SuperLink's alone."""
    key_holders, workers = [], 0
    for cmd, stack_env in stacks:
        for cid in sh([*cmd, "ps", "-q"], stack_env, 60).split():
            name = json.loads(sh(["docker", "inspect", cid], stack_env, 60))[0]["Name"]
            processes = [line.split(None, 2) for line in sh(["docker", "top", cid, "-eo", "pid,uid,args"], stack_env, 60).splitlines()[1:]]
            assert processes and all(uid == str(APP_UID) for _, uid, _ in processes), (name, processes)
            workers += sum("client_app.worker" in args for _, _, args in processes)
            assert sh(["docker", "exec", cid, "id", "-u"], stack_env, 60).strip() == str(APP_UID)
            sh(["docker", "exec", cid, "test", "!", "-e", "/certs/ca.key"], stack_env, 60)
            for mount in json.loads(sh(["docker", "inspect", cid], stack_env, 60))[0]["Mounts"]:
                source = Path(mount["Source"])
                assert source != certs / "ca.key" and not (source / "ca.key").exists(), (name, source)
                assert source.parent != certs or source.name in ("ca.crt", "server.pem", "server.key"), (name, source)
                if source.name == "server.key":
                    key_holders.append(name)
    assert workers == 2  # one warm worker per site ran the ClientApps' training
    assert len(key_holders) == 1 and "superlink" in key_holders[0]


def reachable(url: str, ca: str) -> bool:
    try:
        return httpx.get(url, verify=ssl.create_default_context(cafile=ca), timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
