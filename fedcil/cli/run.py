"""``fcil-run``: validate a config, then run it with ``flwr run`` as a local simulation.

It does what a careful user would do by hand: check the config before starting anything
(one-line error on a bad name), start a SuperLink of its own (a private Flower home and
free ports), give each simulated client a share of a GPU when CUDA is there, start the
simulation with as many SuperNodes as ``num_clients``, stream the logs, check the run's
final status with ``flwr list``, and stop the SuperLink and everything it started. Ctrl-C
(SIGINT) or SIGTERM stops the Flower run and every process of it, keeps the last
checkpoint and prints the command that continues the run. With ``model.ssl=true`` it first
finds (or trains) the cached self-supervised checkpoint; ``method=joint`` (the centralised
upper bound) runs in this process, without Flower, and so does any method with
``backend=inprocess`` (the same loop and clients, no SuperLink or Ray).

    fcil-run                                   # the quickstart
    fcil-run dataset=fashion_mnist partition.beta=0.1
    fcil-run experiment=fmnist_ssl method=joint
    fcil-run experiment=fmnist_ssl method=lorm backend=inprocess device=cuda
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pathspec
import psutil
import tomli_w
from omegaconf import DictConfig

from fedcil.checkpoint import STATE_FILE
from fedcil.config import chooses_num_clients, compose_config, override_values, quote_value
from fedcil.errors import ConfigError
from fedcil.files import write_atomic
from fedcil.results import default_output_dir
from fedcil.settings import check_settings

APP_DIR = Path(__file__).resolve().parents[2]
PORT_VARIABLE = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"  # the local SuperLink's port (flwr's default 39091)
CONTROL_PORT_VARIABLE = "FLWR_LOCAL_CONTROL_API_PORT"  # its Control API port (flwr's default 39093)
DEFAULT_PORT = 39091
STOP_RUN_SECONDS = 30  # the longest wait for `flwr stop`
STOP_PROCESS_SECONDS = 10  # the longest wait for a process to end after SIGTERM (then SIGKILL)
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class FlowerSite:
    """Where a local simulation runs: Flower's home directory and the local SuperLink's ports."""

    home: Path
    port: int
    control_port: int

    @classmethod
    def from_env(cls) -> FlowerSite:
        """``FLWR_HOME`` (default ``.flwr-home`` in the app), ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``
        (default 39091) and ``FLWR_LOCAL_CONTROL_API_PORT`` (default: a free port)."""
        home = Path(os.environ.get("FLWR_HOME", APP_DIR / ".flwr-home")).resolve()
        port = int(os.environ.get(PORT_VARIABLE, DEFAULT_PORT))
        return cls(home, port, int(os.environ.get(CONTROL_PORT_VARIABLE) or free_port()))

    @classmethod
    def isolated(cls, home: Path) -> FlowerSite:
        """A private site: its own home and free ports (parallel runs do not meet)."""
        port, control_port = free_ports(2)
        return cls(home.resolve(), port, control_port)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    return free_ports(1)[0]


def superlink_running(port: int) -> bool:
    """Whether a local SuperLink answers on ``port``."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success
    except httpx.HTTPError:
        return False


def listening_process(port: int) -> psutil.Process | None:
    """The process listening on TCP ``port`` on this machine, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                return psutil.Process(conn.pid)
    return None


def runs_program(proc: psutil.Process, program: str) -> bool:
    """Whether ``proc`` runs the console script ``program`` (``python .../program ...``)."""
    with contextlib.suppress(psutil.Error):
        return any(Path(arg).name == program for arg in proc.cmdline()[:2])
    return False


def descendants(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and all their descendants, each once (those already gone left out)."""
    family = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    return list(family.values())


def superlink_family(port: int) -> list[psutil.Process]:
    """The SuperLink of ``port`` (listening, or a ``flower-superlink --port PORT`` still starting) and its descendants."""
    heads = [proc for proc in [listening_process(port)] if proc]
    for proc in psutil.process_iter():
        if runs_program(proc, "flower-superlink"):
            with contextlib.suppress(psutil.Error):
                args = proc.cmdline()
                if any(arg == "--port" and value == str(port) for arg, value in zip(args, args[1:])):
                    heads.append(proc)
    return descendants(heads)


def simulation_family(port: int) -> list[psutil.Process]:
    """The one simulation (``flwr-simulation``) under the SuperLink of ``port`` and its descendants (Ray);
    nothing when there are several."""
    simulations = [proc for proc in superlink_family(port) if runs_program(proc, "flwr-simulation")]
    return descendants(simulations) if len(simulations) == 1 else []


def still_running(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` seconds (a zombie has ended: its parent may never reap it)."""

    def running(proc: psutil.Process) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        return False

    deadline = time.monotonic() + timeout
    alive = [proc for proc in procs if running(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [proc for proc in alive if running(proc)]
    return alive


def stop_processes(processes: Iterable[psutil.Process]) -> None:
    """Terminate ``processes`` and their descendants now; kill those still running after a bounded wait."""
    family = descendants(processes)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    stubborn = still_running(family, STOP_PROCESS_SECONDS)
    for member in stubborn:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    still_running(stubborn, STOP_PROCESS_SECONDS)


def stop_superlink(port: int) -> None:
    """Terminate the SuperLink of ``port`` and its children (superexec, the simulation, Ray)."""
    stop_processes(superlink_family(port))


def write_flower_config(home: Path) -> None:
    """Flower's default ``config.toml`` in ``home`` where it has none (``flwr`` would write the same, and print
    "Flower configuration not found" on every fresh home)."""
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML, FLOWER_CONFIG_FILE

    if not (home / FLOWER_CONFIG_FILE).exists():
        write_atomic(home / FLOWER_CONFIG_FILE, DEFAULT_FLOWER_CONFIG_TOML)


def flower_env(site: FlowerSite) -> dict[str, str]:
    """Environment for ``flwr`` (whose home gets Flower's default config): the site, no telemetry, no per-run
    dependency installs, a 0.25 s task poll, and Ray's coming default of leaving the GPUs visible to actors
    that ask for none (without it every simulation printed Ray's FutureWarning): clients that train
    on CUDA here ask for a share (:func:`gpus_per_client`)."""
    write_flower_config(site.home)
    env = dict(os.environ)
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env["FLWR_HOME"] = str(site.home)
    env[PORT_VARIABLE] = str(site.port)
    env[CONTROL_PORT_VARIABLE] = str(site.control_port)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")  # Flower's default: a task waits up to 1 s
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def gpus_per_client(device: str, cuda_available: bool, num_gpus: float, clients_per_gpu: int) -> float:
    """The Ray GPU share of each simulated client.

    ``client_resources.num_gpus`` when it is set (above 0); otherwise, when the clients
    will train on CUDA (``device`` ``cuda``/``cuda:N``, or ``auto`` with CUDA available),
    ``1 / clients_per_gpu``, so that Ray places at most that many clients on a GPU.
    ``device=cuda`` without CUDA is a :class:`ConfigError`.
    """
    wants_cuda = device == "cuda" or device.startswith("cuda:")
    if wants_cuda and not cuda_available:
        raise ConfigError(f"device={device!r} but no CUDA device is visible here; set device=auto (CUDA when available) or device=cpu")
    if num_gpus > 0 or not (wants_cuda or (device == "auto" and cuda_available)):
        return num_gpus
    return 1 / clients_per_gpu


def cuda_visible(device: str) -> bool:
    """Whether this process sees a CUDA device.

    torch (seconds to import) is asked only when ``device`` may use one and, on Linux, an
    NVIDIA device file exists (CUDA needs one).
    """
    if device == "cpu" or (sys.platform == "linux" and not glob.glob("/dev/nvidia[0-9]*")):
        return False
    import torch

    return torch.cuda.is_available()


def federation_config(num_clients: int, num_cpus: float, num_gpus: float) -> str:
    """``--federation-config`` of a simulation: SuperNodes and client resources."""
    return (
        f"num-supernodes={num_clients} "
        f"client-resources-num-cpus={num_cpus} client-resources-num-gpus={num_gpus:g}"
    )


def run_status(run_id: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """``(status, details)`` of a run from ``flwr list --run-id ID --format json``."""
    out = subprocess.run(
        ["flwr", "list", "--run-id", run_id, "--format", "json"], env=env, cwd=cwd, capture_output=True, text=True
    )
    try:
        run = json.loads(out.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr).strip()[-500:]
    return run["status"], run.get("status-details", "")


def stop_run(run_id: str, env: dict[str, str], cwd: Path) -> None:
    """``flwr stop RUN_ID`` (bounded), in a session of its own so that a second Ctrl-C does not cut it short."""
    print(f"fcil-run: stopping run {run_id}", file=sys.stderr, flush=True)
    try:
        out = subprocess.run(["flwr", "stop", run_id], env=env, cwd=cwd, capture_output=True, text=True,
                             timeout=STOP_RUN_SECONDS, start_new_session=True)
    except subprocess.TimeoutExpired:
        print(f"fcil-run: flwr stop {run_id} did not answer within {STOP_RUN_SECONDS}s", file=sys.stderr, flush=True)
        return
    if out.returncode != 0:
        print(f"fcil-run: flwr stop {run_id} failed: {(out.stdout + out.stderr).strip()[-300:]}", file=sys.stderr, flush=True)


def end_process(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` if it still runs (bounded wait, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_PROCESS_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``output_dir`` keeps its last checkpoint."""

    def __init__(self, signum: int = signal.SIGINT, output_dir: Path | None = None) -> None:
        super().__init__(signum, output_dir)
        self.signum, self.output_dir = signum, output_dir

    @property
    def exit_code(self) -> int:
        """The shell's code of a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum

    @property
    def resumable(self) -> bool:
        """Whether ``output_dir`` holds a checkpoint to go on from (``resume=``)."""
        return self.output_dir is not None and (self.output_dir / STATE_FILE).is_file()


@contextlib.contextmanager
def interruptible(prog: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted`; later ones let the (bounded) clean-up finish."""

    def first(signum: int, frame: object) -> None:
        for sig in INTERRUPTS:
            signal.signal(sig, later)
        raise Interrupted(signum)

    def later(signum: int, frame: object) -> None:
        print(f"{prog}: still stopping the run and its processes", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, first) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def with_pretrained_path(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """``overrides``, plus the cached self-supervised checkpoint's path when ``model.ssl`` asks for one.

    The checkpoint is pretrained first when there is none (see :mod:`fedcil.ssl`).
    """
    if not cfg.model.ssl or cfg.model.pretrained_path:
        return overrides
    from fedcil.ssl import ensure_pretrained  # torch and timm, only when needed

    checkpoint = ensure_pretrained(cfg, log=lambda m: print(m, flush=True)).path
    return [*overrides, f"model.pretrained_path={quote_value(str(checkpoint))}"]


def launch(
    config_name: str, overrides: list[str], keep_superlink: bool = False, site: FlowerSite | None = None,
    app_dir: Path = APP_DIR,
) -> Path:
    """Run one experiment (of the Flower app in ``app_dir``); return its output directory.

    Raises on a failed run, and :class:`Interrupted` (its checkpoint kept) on SIGINT or
    SIGTERM (with :func:`interruptible`) or a ``KeyboardInterrupt``.
    """
    cfg = compose_config(config_name, overrides)  # fails here, before Flower starts, on a bad name
    check_settings(cfg)
    res = cfg.client_resources
    num_gpus = gpus_per_client(cfg.device, cuda_visible(cfg.device), res.num_gpus, res.clients_per_gpu)
    values = override_values(overrides)
    given = values.get("output_dir") or values.get("resume")
    out = Path(str(given)).expanduser().resolve() if given else default_output_dir(cfg, Path.cwd())
    overrides = [o for o in overrides if not o.startswith(("output_dir=", "resume="))] + [f"output_dir={quote_value(str(out))}"]
    if values.get("resume"):
        overrides.append(f"resume={quote_value(str(Path(str(values['resume'])).expanduser().resolve()))}")
    try:
        overrides = with_pretrained_path(cfg, overrides)
        if cfg.method.name == "joint":  # centralised upper bound: no Flower
            from fedcil.joint import run_joint

            run_joint(compose_config(config_name, overrides), log=lambda m: print(m, flush=True))
        elif cfg.backend == "inprocess":  # the same loop and clients, without Flower's runtime
            from fedcil.cli.inprocess import run_inprocess

            run_inprocess(compose_config(config_name, overrides))
        else:
            if not chooses_num_clients(overrides):  # the federation started here has cfg.num_clients SuperNodes
                overrides.append(f"num_clients={cfg.num_clients}")
            federation = federation_config(cfg.num_clients, res.num_cpus, num_gpus)
            if num_gpus != res.num_gpus:
                print(f"fcil-run: CUDA is visible: each simulated client gets {num_gpus:g} of a GPU "
                      f"(client_resources.clients_per_gpu={res.clients_per_gpu})", flush=True)
            run_flower(config_name, overrides, federation, keep_superlink, site, app_dir)
    except KeyboardInterrupt as exc:
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), out) from None
    return out


def run_site() -> tuple[FlowerSite, bool]:
    """The site of a run and whether it is private: the SuperLink that ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``
    names when it is set, else a SuperLink of the run's own (a temporary home, free ports)."""
    if os.environ.get(PORT_VARIABLE):
        site = FlowerSite.from_env()
        state = "joining the running" if superlink_running(site.port) else "starting a"
        print(f"fcil-run: {state} SuperLink on 127.0.0.1:{site.port} ({PORT_VARIABLE} is set; FLWR_HOME={site.home})",
              flush=True)
        return site, False
    return FlowerSite.isolated(Path(tempfile.mkdtemp(prefix="fcil-flwr-"))), True


def stage_app(app_dir: Path, dest: Path) -> Path:
    """``dest``, holding a copy of the files of ``app_dir`` that its ``.gitignore`` does not ignore.

    ``flwr run`` builds the app's FAB by visiting every file under the app directory, a
    virtual environment's included, before it applies the ``.gitignore`` (seconds for a
    ``.venv``); from this copy it builds the same FAB at once.
    """
    ignore = app_dir / ".gitignore"
    spec = pathspec.GitIgnoreSpec.from_lines(ignore.read_text().splitlines() if ignore.is_file() else [])
    for root, dirs, files in os.walk(app_dir):
        here = Path(root)
        rel = here.relative_to(app_dir)
        dirs[:] = [d for d in dirs if d != ".git" and not spec.match_file(f"{(rel / d).as_posix()}/")]
        for name in files:
            if not spec.match_file((rel / name).as_posix()) and not (here / name).is_symlink():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(here / name, dest / rel / name)
    return dest


def run_flower(
    config_name: str, overrides: list[str], federation: str, keep_superlink: bool, site: FlowerSite | None,
    app_dir: Path,
) -> None:
    """One ``flwr run`` of the app on ``site`` (by default :func:`run_site`); raises unless it completes.

    However it ends, the run is stopped if it did not finish, and the SuperLink started
    here is stopped with every process below it (unless ``keep_superlink``).
    """
    site, private = (site, False) if site else run_site()
    site.home.mkdir(parents=True, exist_ok=True)
    env = flower_env(site)
    started_here = not superlink_running(site.port)
    stops_superlink = started_here and not keep_superlink
    # Through a TOML file: flwr's inline --run-config cannot carry quotes.
    run_config = site.home / f"run-config-{os.getpid()}.toml"
    app = site.home / f"app-{os.getpid()}"
    command = ["flwr", "run", str(app), "--stream", "--federation-config", federation, "--run-config", str(run_config)]
    proc, run_id, status, doomed = None, None, "", []
    try:
        run_config.write_text(tomli_w.dumps({"config-name": config_name, "overrides": shlex.join(overrides)}))
        stage_app(app_dir, app)
        # Started outside the app directory, so that Ray workers import the installed app.
        proc = subprocess.Popen(command, env=env, cwd=site.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = re.search(r"Successfully started run (\d+)", line)
            run_id = run_id or (match.group(1) if match else None)
        proc.wait()
        if run_id is None:
            raise RuntimeError(f"flwr run did not start a run (exit code {proc.returncode})")
        status, details = run_status(run_id, env, site.home)
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ended {status}: {details}")
    except BaseException:
        if run_id is not None and not status.startswith("finished"):
            # Found before the run stops: Ray's processes outlive a stopped simulation.
            doomed = superlink_family(site.port) if stops_superlink else simulation_family(site.port)
            stop_run(run_id, env, site.home)
        raise
    finally:
        if proc is not None:
            end_process(proc)
            proc.stdout.close()
        run_config.unlink(missing_ok=True)
        shutil.rmtree(app, ignore_errors=True)
        stop_processes([*doomed, *(superlink_family(site.port) if stops_superlink else [])])
        if stops_superlink and private:
            shutil.rmtree(site.home, ignore_errors=True)
        if started_here and keep_superlink:
            print(f"fcil-run: the SuperLink keeps running on 127.0.0.1:{site.port}; use it with "
                  f"FLWR_HOME={shlex.quote(str(site.home))} {PORT_VARIABLE}={site.port}", flush=True)


def interrupted_line(prog: list[str], overrides: list[str], interrupted: Interrupted) -> str:
    """What to type after an interruption: ``resume=`` the output folder once it holds a checkpoint."""
    if not interrupted.resumable:
        return f"interrupted before its first checkpoint; start again with: {shlex.join([*prog, *overrides])}"
    out = str(interrupted.output_dir)
    kept = [o for o in overrides if not o.startswith(("output_dir=", "resume="))]
    path = out if re.fullmatch(r"[\w./:-]+", out) else quote_value(out)
    return f"interrupted; continue with: {shlex.join([*prog, *kept, f'resume={path}'])}"


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="fcil-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=fashion_mnist partition.beta=0.1")
    parser.add_argument("--config-name", default="config", help="top-level config in conf/ (default: config)")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    args = parser.parse_args(argv)
    with interruptible("fcil-run"):
        try:
            out = launch(args.config_name, args.overrides, args.keep_superlink)
        except ConfigError as exc:
            print(f"fcil-run: error: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            print(f"fcil-run: {exc}", file=sys.stderr)
            return 1
        except Interrupted as exc:
            prog = ["fcil-run", *(["--config-name", args.config_name] if args.config_name != "config" else []),
                    *(["--keep-superlink"] if args.keep_superlink else [])]
            print(f"fcil-run: {interrupted_line(prog, args.overrides, exc)}", file=sys.stderr, flush=True)
            return exc.exit_code
    print(f"fcil-run: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
