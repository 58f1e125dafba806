"""A SuperNode's warm worker: one long-lived process that answers its ClientApp's requests.

In a deployment Flower starts a fresh ``flwr-clientapp`` process for every message. Importing
torch, timm and PEFT, loading the data and building the model would cost that process
seconds each time; instead it hands the request to this worker, which keeps all of that
loaded between messages, and sends back the worker's reply. The replies are the same bytes
the ClientApp would compute itself.

- **Start and reuse.** The first request starts the worker (``python -m client_app.worker``,
  in a session of its own); later ones find its socket. A worker belongs to one app
  version (the FAB's directory), one node and one SuperExec: a new FAB or a restarted
  SuperNode gets a new worker.
- **Stop.** It exits when the SuperExec that starts the ClientApps is gone, after
  ``IDLE_SECONDS`` without a request, or on SIGTERM/SIGINT, and removes its socket (its log stays).
  That SuperExec is the ``flwr-clientapp`` process's parent: the SuperNode's child under
  subprocess isolation, a process of its own under process isolation (``deploy_local.sh``
  starts it with ``--parent-pid`` of its SuperNode, so it still goes with its node).
- **Access.** The socket lives in ``$TMPDIR/fedcil-<uid>``, a directory only this user can
  open (checked); the worker also refuses a peer of another user (``SO_PEERCRED``).
- **Failures.** An exception while answering goes back to the ClientApp, which raises it
  (a ``ConfigError`` stays one); a worker that dies mid-request is replaced on the next one.

Messages on the socket are frames: two big-endian 32-bit sizes, a JSON header and a body
(the request's or reply's records as Flower's protobuf).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client_app.node import NodeJob
from fedcil.errors import ConfigError

APP_DIR = Path(__file__).resolve().parents[1]
IDLE_SECONDS = 900.0
"""A worker with no request for this long exits (the next request starts a new one)."""
START_SECONDS = 300.0
"""How long a ClientApp waits for a new worker to import torch, timm and PEFT and listen."""
_SIZES = struct.Struct(">II")


class WorkerError(RuntimeError):
    """The node's worker could not be started or reached, or failed while answering."""


def runtime_dir() -> Path:
    """``$TMPDIR/fedcil-<uid>``, created private to this user; an error if others can open it."""
    path = Path(tempfile.gettempdir()) / f"fedcil-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerError(f"{path} must belong to uid {os.getuid()} with mode 0700 (it has mode "
                          f"{info.st_mode & 0o777:o}, uid {info.st_uid}); remove it")
    return path


def worker_base(node_id: int, watch_pid: int) -> Path:
    """Where the worker of this app, interpreter, node and SuperExec keeps ``.sock``, ``.log`` and ``.lock``."""
    key = hashlib.sha256(f"{APP_DIR}\0{sys.executable}\0{node_id}\0{watch_pid}".encode()).hexdigest()[:16]
    return runtime_dir() / f"worker-{key}"


def send_frame(sock: socket.socket, header: dict, body: bytes = b"") -> None:
    """Write one frame."""
    head = json.dumps(header).encode()
    sock.sendall(_SIZES.pack(len(head), len(body)) + head + body)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    """Read one frame: ``(header, body)``."""
    head_size, body_size = _SIZES.unpack(_read_exactly(sock, _SIZES.size))
    return json.loads(_read_exactly(sock, head_size)), _read_exactly(sock, body_size)


def records_to_bytes(content: RecordDict) -> bytes:
    """Records as Flower's protobuf."""
    return recorddict_to_proto(content).SerializeToString()


def records_from_bytes(data: bytes) -> RecordDict:
    """The inverse of :func:`records_to_bytes`."""
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# --- the ClientApp's side -------------------------------------------------------------------


def ask(job: NodeJob, content: RecordDict, node_id: int, watch_pid: int) -> RecordDict:
    """The reply records to ``content``, from this node's worker (started first if none runs).

    ``watch_pid`` is the SuperExec's pid: the worker lives as long as it does.
    """
    base = worker_base(node_id, watch_pid)
    with connect(base, watch_pid) as sock:
        send_frame(sock, {"job": asdict(job)}, records_to_bytes(content))
        try:
            header, body = recv_frame(sock)
        except ConnectionError:
            raise WorkerError(f"the node's worker stopped while answering; its log: {base}.log") from None
    if "error" in header:
        error = ConfigError if header["error"] == "ConfigError" else WorkerError
        raise error(header["message"] if error is ConfigError else f"{header['error']}: {header['message']}")
    return records_from_bytes(body)


def _open(base: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(f"{base}.sock")
    except OSError:
        sock.close()
        raise
    return sock


def connect(base: Path, watch_pid: int) -> socket.socket:
    """A connection to the worker at ``base``; one ClientApp at a time starts a missing one."""
    with open(f"{base}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            return _open(base)
        Path(f"{base}.sock").unlink(missing_ok=True)  # left by a worker that is gone
        proc = start_worker(base, watch_pid)
        deadline = time.monotonic() + START_SECONDS
        while True:
            with contextlib.suppress(OSError):
                sock = _open(base)
                print(f"fedcil: started this node's warm worker (pid {proc.pid}, log {base}.log)", flush=True)
                return sock
            if proc.poll() is not None:
                raise WorkerError(f"the node's worker exited with code {proc.returncode}; its log: {base}.log")
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerError(f"the node's worker did not listen within {START_SECONDS:g} s; its log: {base}.log")
            time.sleep(0.05)


def start_worker(base: Path, watch_pid: int) -> subprocess.Popen:
    """Start ``python -m client_app.worker`` on ``base`` in a session of its own."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
    with open(f"{base}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "client_app.worker", str(base), "--watch-pid", str(watch_pid)],
            cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --- the worker's side ----------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def same_user(conn: socket.socket) -> bool:
    """Whether the peer of ``conn`` runs as this user."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


def handle(conn: socket.socket) -> None:
    """Answer one request on ``conn``."""
    from client_app.local_round import answer

    header, body = recv_frame(conn)
    try:
        job = NodeJob(**{**header["job"], "overrides": tuple(header["job"]["overrides"])})
        reply = records_to_bytes(answer(job, records_from_bytes(body)))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the ClientApp
        send_frame(conn, {"error": type(exc).__name__, "message": str(exc)})
        return
    send_frame(conn, {}, reply)


def serve(base: Path, watch_pid: int, idle_seconds: float = IDLE_SECONDS) -> None:
    """Listen on ``base.sock`` and answer requests one at a time until told or left to stop."""
    import client_app.local_round  # noqa: F401 - the heavy imports, before listening

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    path = f"{base}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o600)
        server.listen(8)
        server.settimeout(1.0)
        print(f"listening on {path} (pid {os.getpid()}, watching pid {watch_pid})", flush=True)
        last = time.monotonic()
        while alive(watch_pid) and time.monotonic() - last < idle_seconds:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    if same_user(conn):
                        handle(conn)
                except (OSError, ValueError) as exc:  # a peer that went away or sent garbage
                    print(f"request dropped: {exc}", flush=True)
            last = time.monotonic()
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)
        Path(f"{base}.lock").unlink(missing_ok=True)
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m client_app.worker BASE --watch-pid PID [--idle-seconds S]``."""
    parser = argparse.ArgumentParser(prog="python -m client_app.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="path prefix of the socket, log and lock files")
    parser.add_argument("--watch-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS, help="exit after this long without a request")
    args = parser.parse_args(argv)
    serve(args.base, args.watch_pid, args.idle_seconds)


if __name__ == "__main__":
    main()
