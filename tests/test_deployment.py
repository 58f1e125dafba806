"""A real deployment as plain processes: SuperLink with TLS and a state database, 3 SuperNodes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import Context, RecordDict

from client_app.node import node_overrides
from fedcil.cli.export_sites import main as export_main
from fedcil.cli.run import APP_DIR, free_port, launch, listening_process

pytestmark = pytest.mark.e2e

DEPLOY = APP_DIR / "scripts" / "deploy_local.sh"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["num_tasks=2", "rounds_per_task=1", "num_clients=3", "local_epochs=3", "partition=iid"]


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
    assert [r["clients"] for r in results["rounds"]] == [3, 3]
    assert all(r["bytes_up"] > 0 and not r["missing"] for r in results["rounds"])
    assert [r["authenticated_keys"] for r in results["rounds"]] == [3, 3]  # signed with the SuperNode keys
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
    # every node answered its training messages through one warm worker, which left with the node;
    # the ClientApps run under the node's SuperExec, so their output is in its log
    assert [(work / f"clientapp-{i}.log").read_text().count("started this node's warm worker") for i in range(3)] == [1, 1, 1]
    assert not processes_of(work), "a process of the deployment outlived it"


def make_site_key(path: Path) -> None:
    """A SuperNode's EC key pair (``path`` and ``path.pub``), made as docs/deployment.md tells a site to."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(path)], check=True)


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


SERVER_HOST, SITE_HOST = "10.231.7.1", "10.231.7.2"  # a private test subnet, inside the namespaces only


@pytest.fixture
def two_hosts():
    """Two network namespaces, a server host and a site host, joined by a veth pair on
    10.231.7.0/24 and nothing else; removed afterwards, also on failure."""
    tag = f"fdep{os.getpid() % 100000}"
    hosts = {"server": (f"{tag}s", f"{tag}a", SERVER_HOST), "site": (f"{tag}c", f"{tag}b", SITE_HOST)}
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("two hosts need iproute2's ip (network namespaces) and util-linux's unshare")
    made = []
    try:
        for name, link, _ in hosts.values():
            added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if added.returncode:
                pytest.skip(f"network namespaces are not permitted here (ip netns add: {added.stderr.strip()}): needs root and iproute2")
            made.append(name)
        ip = functools.partial(subprocess.run, check=True, capture_output=True)
        ip(["ip", "link", "add", hosts["server"][1], "type", "veth", "peer", "name", hosts["site"][1]])
        for name, link, address in hosts.values():
            ip(["ip", "link", "set", link, "netns", name])
            for command in (f"ip addr add {address}/24 dev {link}", f"ip link set {link} up", "ip link set lo up"):
                ip(["ip", "netns", "exec", name, *command.split()])
        yield {role: (name, link) for role, (name, link, _) in hosts.items()}
    finally:
        subprocess.run(["ip", "link", "del", hosts["server"][1]], capture_output=True)  # if it never left this namespace
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_host(host: tuple[str, str]) -> list[str]:
    """The prefix that runs a command on ``host`` (its namespace), stopped after 10 minutes at most."""
    return ["timeout", "600", "ip", "netns", "exec", host[0]]


def veth_bytes(host: tuple[str, str], direction: str) -> int:
    name, link = host
    out = subprocess.run(["ip", "netns", "exec", name, "cat", f"/sys/class/net/{link}/statistics/{direction}_bytes"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_three_sites_on_a_site_host_with_only_their_folders_replay_the_simulation_over_tls_to_the_server_host(tmp_path, two_hosts):
    """Two hosts (network namespaces): the server host runs the SuperLink, its SuperExec and the run
    (deploy_local.sh -r server), the site host 3 SuperNodes and their SuperExecs (-r site -s), each
    reading only its site folder exported by fcil-export-sites, with SuperNode authentication (-a):
    the site host makes the key pairs and the server host registers the public keys it was sent. No full data set is reachable on the
    site host: the copy the sites came from is deleted, the run's dataset.root names it, and the
    site host sees an empty /usr/share/datasets. The server loads no data (evaluation=clients).
    The accuracy matrix equals the in-process simulation's exactly."""
    source = tmp_path / "fashion-mnist"
    shutil.copytree(FMNIST, source)
    run = ["dataset=fashion_mnist", f"dataset.root={source}", "train_per_class=30", "test_per_class=20", "num_tasks=2",
           "rounds_per_task=1", "num_clients=3", "local_epochs=1", "partition=iid", "evaluation=clients"]
    server, site, operator = tmp_path / "server-host", tmp_path / "site-host", tmp_path / "operator"
    assert export_main(["--out", str(site / "sites"), *run]) == 0
    local = json.loads((launch("config", [*run, "backend=inprocess", f"output_dir={tmp_path / 'local'}"]) / "results.json").read_text())
    shutil.rmtree(source)

    # The operator's credentials; each host gets only its own files (ca.key stays with the operator).
    subprocess.run(["bash", str(APP_DIR / "docker" / "certs.sh"), str(operator / "certs"), f"IP:{SERVER_HOST}"], check=True, capture_output=True)
    subprocess.run(["bash", str(APP_DIR / "docker" / "secrets.sh"), str(operator / "secrets"), "superlink",
                    *(f"supernode-{i}" for i in range(3))], check=True, capture_output=True)
    given = {server: ["certs/ca.crt", "certs/server.pem", "certs/server.key", "secrets/superlink"],
             site: ["certs/ca.crt", *(f"secrets/supernode-{i}" for i in range(3))]}
    for host, files in given.items():
        for file in files:
            (host / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(operator / file, host / file)
    # -a: each site's key pair is made on the site host; only the public keys travel.
    (site / "keys").mkdir()
    (server / "keys").mkdir()
    for i in range(3):
        make_site_key(site / "keys" / f"supernode-{i}")
        shutil.copy2(site / "keys" / f"supernode-{i}.pub", server / "keys" / f"supernode-{i}.pub")
    (site / "keys" / "trusted.pub").write_text("".join((site / "keys" / f"supernode-{i}.pub").read_text() for i in range(3)))

    port = "9093"  # the server host's own network: nothing else listens there
    server_cmd = [*in_host(two_hosts["server"]), "bash", str(DEPLOY), "-r", "server", "-a", "-w", str(server), "-l", SERVER_HOST, "-p", port,
                  *run, "node_wait_seconds=120"]
    site_cmd = [*in_host(two_hosts["site"]), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs none /usr/share/datasets && exec "$@"', "sh",
                "bash", str(DEPLOY), "-r", "site", "-a", "-w", str(site), "-l", SERVER_HOST, "-p", port, "-n", "3", "-s", str(site / "sites")]
    lines, sites = [], None
    proc = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            lines.append(line)
            if sites is None and line.startswith("== 5."):  # the SuperLink answers: the SuperNodes can dial it
                with (tmp_path / "site-host.log").open("w") as log:
                    sites = subprocess.Popen(site_cmd, stdout=log, stderr=subprocess.STDOUT)
        proc.wait(timeout=60)
        traffic = [veth_bytes(two_hosts["site"], d) for d in ("tx", "rx")]
    finally:
        proc.kill()
        if sites is not None:
            sites.terminate()  # the site role stops its SuperNodes and their SuperExecs
            try:
                sites.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sites.kill()
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:] + (tmp_path / "site-host.log").read_text()[-3000:]
    assert "finished:completed" in output
    deployed = json.loads((server / "results" / "results.json").read_text())
    assert [r["clients"] for r in deployed["rounds"]] == [3, 3]
    assert deployed["accuracy_matrix"] == local["accuracy_matrix"]
    assert min(traffic) > 100_000  # the federation went over the veth pair, both ways
    assert "SuperNodes 0..2 serving" in (tmp_path / "site-host.log").read_text()
    assert sorted(p.name for p in (site / "certs").iterdir()) == ["ca.crt"]  # nothing was made on the site host
    assert not (server / "secrets" / "supernode-0").exists() and not (site / "secrets" / "superlink").exists()
    assert all(json.loads((server / f"register-{i}.json").read_text())["success"] for i in range(3))
    assert sorted(p.name for p in (server / "keys").iterdir()) == [f"supernode-{i}.pub" for i in range(3)]  # no private key
    assert not processes_of(server) and not processes_of(site)


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n 0 is not a positive number of SuperNodes"),
    (["-r", "hub"], "-r hub is not a role; valid choices: all, server, site"),
    (["-n", "2", "-s", "{tmp}/sites"], "-s {tmp}/sites has no site-0, SuperNode 0's folder"),
    (["-l", "10.0.0.5"], "-l, -p and -i are for -r server and -r site"),
    (["-r", "site", "-n", "3"], "-r site needs -w WORKDIR, -l ADDRESS and -p PORT"),
    (["-r", "site", "-l", "10.0.0.5", "-p", "9093", "-n", "3", "-i", "3"], "-i 3 is not a SuperNode of 0..2"),
    (["-r", "site", "-l", "10.0.0.5", "-p", "9093", "-n", "3", "-i", "1"], "-r site needs {tmp}/w/certs/ca.crt"),
    (["-r", "server", "-l", "10.0.0.5", "-p", "9093", "-s", "{tmp}"], "-i, -d, -s and -x are for the SuperNodes"),
    (["-r", "server", "-l", "10.0.0.5", "-p", "9093"], "-r server needs {tmp}/w/certs/ca.crt"),
])
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, args, message):
    """One line naming the bad value, exit code 2, and no work folder made."""
    args = [a.format(tmp=tmp_path) for a in args]
    work = ["-w", str(tmp_path / "w")] if "-r" in args else []
    out = subprocess.run(["bash", str(DEPLOY), *args, *work], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("deploy_local.sh: ") and out.stderr.count("\n") == 1
    assert message.format(tmp=tmp_path) in out.stderr
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


def test_a_site_whose_supernode_key_is_not_registered_is_refused_and_its_site_role_fails(tmp_path):
    """--enable-supernode-auth: a SuperNode whose public key was never registered cannot join, and
    deploy_local.sh -r site, which otherwise serves until stopped, exits 1 and stops its SuperExec."""
    certs, site = tmp_path / "certs", tmp_path / "site"
    subprocess.run(["bash", str(APP_DIR / "docker" / "certs.sh"), str(certs)], check=True, capture_output=True)
    subprocess.run(["bash", str(APP_DIR / "docker" / "secrets.sh"), str(site / "secrets"), "supernode-0"], check=True, capture_output=True)
    (site / "certs").mkdir()
    shutil.copy2(certs / "ca.crt", site / "certs" / "ca.crt")
    (site / "keys").mkdir()
    make_site_key(site / "keys" / "supernode-0")
    shutil.copy2(site / "keys" / "supernode-0.pub", site / "keys" / "trusted.pub")
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0"}  # it starts flower-superexec
    # In its own process group: it starts a flower-superexec, stopped with it.
    link = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
         "--ssl-keyfile", str(certs / "server.key"), "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port),
         "--enable-supernode-auth"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while listening_process(port) is None and time.monotonic() < deadline:
            assert link.poll() is None, "the SuperLink exited"
            time.sleep(0.5)
        out = subprocess.run(["bash", str(DEPLOY), "-r", "site", "-a", "-w", str(site), "-l", "127.0.0.1", "-p", str(port), "-n", "1"],
                             capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(link.pid, signal.SIGKILL)
        link.wait()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Failed to activate SuperNode" in (site / "supernode-0.log").read_text()
    assert "deploy_local.sh: stopped" in out.stdout
    assert not processes_of(site), "a process of the site outlived it"
