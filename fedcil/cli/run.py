"""``fcil-run``: validate a config, then run it with ``flwr run`` as a local simulation.

It does what a careful user would do by hand: check the config before starting anything
(one-line error on a bad name), give Flower its own home and ports, start the simulation
with as many SuperNodes as ``num_clients``, stream the logs, check the run's final status
with ``flwr list``, and stop the local SuperLink it started. With ``model.ssl=true`` it
first finds (or trains) the cached self-supervised checkpoint; ``method=joint`` (the
centralised upper bound) runs in this process, without Flower, and so does any method
with ``backend=inprocess`` (the same loop and clients, no SuperLink or Ray).

    fcil-run                                   # the quickstart
    fcil-run dataset=fashion_mnist partition.beta=0.1
    fcil-run experiment=fmnist_ssl method=joint
    fcil-run experiment=fmnist_ssl method=lorm backend=inprocess device=cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import tomli_w
from omegaconf import DictConfig

from fedcil.config import chooses_num_clients, compose_config, override_values, quote_value
from fedcil.errors import ConfigError
from fedcil.results import default_output_dir
from fedcil.settings import check_settings

APP_DIR = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 39091


@dataclass(frozen=True)
class FlowerSite:
    """Where a local simulation runs: Flower's home directory and the SuperLink's port."""

    home: Path
    port: int

    @classmethod
    def from_env(cls) -> FlowerSite:
        """``FLWR_HOME`` (default ``.flwr-home`` in the app) and ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``."""
        home = Path(os.environ.get("FLWR_HOME", APP_DIR / ".flwr-home")).resolve()
        return cls(home, int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_PORT)))

    @classmethod
    def isolated(cls, home: Path) -> FlowerSite:
        """A private site: its own home and a free port (parallel runs do not meet)."""
        return cls(home.resolve(), free_port())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def stop_superlink(port: int) -> None:
    """Terminate the process listening on ``port`` and its children (superexec, Ray)."""
    proc = listening_process(port)
    try:
        family = proc.children(recursive=True) + [proc] if proc else []
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=10)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def flower_env(site: FlowerSite) -> dict[str, str]:
    """Environment for ``flwr``: the site, no telemetry, no per-run dependency installs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(site.home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(site.port)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def federation_config(cfg: DictConfig) -> str:
    """``--federation-config`` for a simulation of ``cfg``: SuperNodes and client resources."""
    res = cfg.client_resources
    return (
        f"num-supernodes={cfg.num_clients} "
        f"client-resources-num-cpus={res.num_cpus} client-resources-num-gpus={res.num_gpus}"
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
    """Run one experiment (of the Flower app in ``app_dir``); return its output directory. Raises on a failed run."""
    cfg = compose_config(config_name, overrides)  # fails here, before Flower starts, on a bad name
    check_settings(cfg)
    values = override_values(overrides)
    given = values.get("output_dir") or values.get("resume")
    out = Path(str(given)).expanduser().resolve() if given else default_output_dir(cfg, Path.cwd())
    overrides = [o for o in overrides if not o.startswith(("output_dir=", "resume="))] + [f"output_dir={quote_value(str(out))}"]
    if values.get("resume"):
        overrides.append(f"resume={quote_value(str(Path(str(values['resume'])).expanduser().resolve()))}")
    overrides = with_pretrained_path(cfg, overrides)
    if cfg.method.name == "joint":  # centralised upper bound: no Flower
        from fedcil.joint import run_joint

        run_joint(compose_config(config_name, overrides), log=lambda m: print(m, flush=True))
        return out
    if cfg.backend == "inprocess":  # the same loop and clients, without Flower's runtime
        from fedcil.cli.inprocess import run_inprocess

        run_inprocess(compose_config(config_name, overrides))
        return out
    if not chooses_num_clients(overrides):  # the federation started here has cfg.num_clients SuperNodes
        overrides.append(f"num_clients={cfg.num_clients}")
    site = site or FlowerSite.from_env()
    site.home.mkdir(parents=True, exist_ok=True)
    env = flower_env(site)
    started_here = not superlink_running(site.port)
    # Through a TOML file: flwr's inline --run-config cannot carry quotes.
    run_config = site.home / f"run-config-{os.getpid()}.toml"
    run_config.write_text(tomli_w.dumps({"config-name": config_name, "overrides": shlex.join(overrides)}))
    command = [
        "flwr", "run", str(app_dir), "--stream",
        "--federation-config", federation_config(cfg),
        "--run-config", str(run_config),
    ]
    run_id = None
    try:
        # Started outside the app directory, so that Ray workers import the installed app.
        with subprocess.Popen(
            command, env=env, cwd=site.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                match = re.search(r"Successfully started run (\d+)", line)
                run_id = run_id or (match.group(1) if match else None)
        if run_id is None:
            raise RuntimeError(f"flwr run did not start a run (exit code {proc.returncode})")
        status, details = run_status(run_id, env, site.home)
        if status != "finished:completed":
            raise RuntimeError(f"run {run_id} ended {status}: {details}")
    finally:
        run_config.unlink(missing_ok=True)
        if started_here and not keep_superlink:
            stop_superlink(site.port)
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="fcil-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=fashion_mnist partition.beta=0.1")
    parser.add_argument("--config-name", default="config", help="top-level config in conf/ (default: config)")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    args = parser.parse_args(argv)
    try:
        out = launch(args.config_name, args.overrides, args.keep_superlink)
    except ConfigError as exc:
        print(f"fcil-run: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"fcil-run: {exc}", file=sys.stderr)
        return 1
    print(f"fcil-run: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
