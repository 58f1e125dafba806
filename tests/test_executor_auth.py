"""Executor (SuperExec) authentication: only an executor that holds the shared secret gets tasks.

A real SuperLink and a real SuperNode, both in process isolation with
``--superexec-auth-secret-file`` (each its own secret), on free loopback ports. Their app
APIs are asked for a task the way ``flower-superexec`` asks, with Flower's own client and
signing code: unsigned, signed with a wrong secret, signed right, and a signed request
replayed. The real ``flower-superexec`` is run too, with a wrong secret and with the right one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufCall, ProtobufRequestContext
from flwr.supercore.runtime import RuntimeHttpClient

from fedcil.cli.run import APP_DIR, free_port

BIN = Path(sys.executable).parent
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the one call flower-superexec signs (flwr 1.42)
WAIT = 60.0  # seconds, at most, for a process to listen or to exit


@pytest.fixture(scope="module")
def apis(tmp_path_factory) -> Iterator[dict]:
    """A SuperLink and a SuperNode that demand executor authentication: their ports, secrets and logs."""
    tmp = tmp_path_factory.mktemp("executor-auth")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_HOME": str(tmp / "flwr-home"), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    ports = {"superlink": free_port(), "supernode": free_port()}
    secrets = {side: tmp / side for side in ports}
    for path in secrets.values():
        path.write_bytes(os.urandom(32).hex().encode())
    # A state file, as in deployment: Flower's ":memory:" database shares one SQLite connection
    # across the API's threads, and a request that meets the SuperNode's own can fail with 500.
    with contextlib.ExitStack() as stack:
        for side, cmd in (
            ("superlink", ["flower-superlink", "--insecure", "--database", str(tmp / "state.db"), "--host", "127.0.0.1"]),
            ("supernode", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{ports['superlink']}"]),
        ):
            proc = stack.enter_context(started(
                [*cmd, "--port", str(ports[side]), "--isolation", "process", "--superexec-auth-secret-file", str(secrets[side])],
                tmp / f"{side}.log", env,
            ))
            wait_listening(ports[side], proc)
        yield {"ports": ports, "secrets": secrets, "logs": {side: tmp / f"{side}.log" for side in ports}, "env": env, "tmp": tmp}


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``cmd`` running in a session of its own, logging to ``log``; killed by its pid (and group) on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"nothing listens on port {port} after {WAIT:g} s"
        time.sleep(0.2)


class Capture:
    """Keeps the SuperExec authentication headers of the last request it passed on."""

    def __init__(self):
        self.headers: dict[str, str] = {}

    def intercept(self, context: ProtobufRequestContext, call_next: ProtobufCall) -> httpx.Response:
        self.headers = {k: v for k, v in context.request.headers.items() if k.startswith("flwr-superexec-")}
        return call_next(context)


class Replay:
    """Sends earlier captured SuperExec authentication headers again."""

    def __init__(self, headers: dict[str, str]):
        self.headers = headers

    def intercept(self, context: ProtobufRequestContext, call_next: ProtobufCall) -> httpx.Response:
        context.request.headers.update(self.headers)
        return call_next(context)


def acquire_task(port: int, interceptors: list) -> int:
    """The HTTP status of one AcquireTask call to the app API on ``port`` (200 with no task: none is pending)."""
    with RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=True, root_certificates=None,
                                               interceptors=interceptors) as client:
        try:
            reply = client.AcquireTask(AcquireTaskRequest())
        except httpx.HTTPStatusError as err:
            return err.response.status_code
    assert not reply.HasField("task") and not reply.token
    return 200


def signed(secret: bytes) -> SuperExecAuthHttpInterceptor:
    return SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})


@pytest.mark.parametrize("side", ["superlink", "supernode"])
def test_an_executor_without_the_secret_or_with_a_wrong_one_is_refused_and_one_with_it_served(apis, side):
    port, secret = apis["ports"][side], apis["secrets"][side].read_bytes()
    other = apis["secrets"]["supernode" if side == "superlink" else "superlink"].read_bytes()
    capture = Capture()
    assert acquire_task(port, []) == 401  # unsigned
    assert acquire_task(port, [signed(b"not the secret")]) == 401
    assert acquire_task(port, [signed(other)]) == 401  # the other API's secret
    assert acquire_task(port, [signed(secret), capture]) == 200
    assert acquire_task(port, [Replay(capture.headers)]) == 401  # its signature again: the nonce is spent
    assert "SuperExec authentication failed" in apis["logs"][side].read_text()


def test_flower_superexec_with_a_wrong_secret_stops_and_with_the_secret_keeps_asking(apis):
    """The real executor: refused (401), it stops itself (with exit status 0); with the secret it polls on."""
    tmp, env, port, log = apis["tmp"], apis["env"], apis["ports"]["superlink"], apis["logs"]["superlink"]
    (tmp / "wrong").write_bytes(b"not the secret")
    refusals = log.read_text().count("SuperExec authentication failed")
    executor = ["flower-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{port}", "--superexec-auth-secret-file"]
    with started([*executor, str(tmp / "wrong")], tmp / "wrong.log", env) as wrong, \
         started([*executor, str(apis["secrets"]["superlink"])], tmp / "right.log", env) as right:
        wrong.wait(timeout=WAIT)  # started with the right one, so that one has asked too by now, or soon
        time.sleep(2.0)  # eight more polls
        assert right.poll() is None, (tmp / "right.log").read_text()
    assert log.read_text().count("SuperExec authentication failed") == refusals + 1  # the wrong one's only


def test_secrets_sh_writes_private_random_secrets_that_git_ignores_and_keeps_existing_ones(tmp_path):
    script = str(APP_DIR / "docker" / "secrets.sh")
    out = tmp_path / "secrets"
    subprocess.run(["bash", script, str(out)], check=True, capture_output=True)
    names = ["superlink", "supernode-0", "supernode-1"]
    first = {name: (out / name).read_bytes() for name in names}
    assert all(len(s) == 64 and int(s, 16) for s in first.values()) and len(set(first.values())) == 3
    assert all((out / name).stat().st_mode & 0o777 == 0o600 for name in names)
    subprocess.run(["bash", script, str(out), "superlink", "supernode-2"], check=True, capture_output=True)
    assert {name: (out / name).read_bytes() for name in names} == first and (out / "supernode-2").is_file()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout == ""
