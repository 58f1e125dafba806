"""``fcil-sweep``: Hydra multirun over ``conf/``, one real Flower simulation per job.

    fcil-sweep -m method=fedavg_lora partition.beta=0.05,0.5 seed=0,1,2

Each job runs through :func:`fedcil.cli.run.launch` on its own private Flower site (home
directory and SuperLink port), so jobs never share a SuperLink and Hydra's parallel
launchers can run them side by side. A job writes its results files into its Hydra job
directory (``<hydra.sweep.dir>/<overrides>``); a failing job writes ``error.json`` there
(error and config) and the sweep goes on. Re-running a sweep skips every job whose
``results.json`` exists for the same config, and resumes a job whose folder holds a
checkpoint of the same config. Ctrl-C (SIGINT) or SIGTERM stops the running job's Flower
run and its processes, keeps its checkpoint and prints the command that continues the sweep.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedcil.checkpoint import IGNORED_KEYS, STATE_FILE
from fedcil.config import CONF_DIR, compose_config, quote_value, to_container
from fedcil.cli.run import FlowerSite, Interrupted, interruptible, launch, with_pretrained_path
from fedcil.files import write_atomic

FAILED_JOBS: list[str] = []


def same_config(path: Path, config: dict) -> bool:
    """Whether ``path`` (``results.json`` or ``checkpoint.json``) was written with ``config``
    (``resume`` and ``output_dir`` aside)."""
    try:
        written = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(written.get(key) == config.get(key) for key in set(written) | set(config) if key not in IGNORED_KEYS)


def run_job(config_name: str, overrides: list[str], job_dir: Path) -> str:
    """Run one sweep job in ``job_dir``; returns ``done``, ``skipped`` or ``failed``."""
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    overrides.append(f"output_dir={quote_value(str(job_dir.resolve()))}")
    error_file = job_dir / "error.json"
    config = None
    try:
        overrides = with_pretrained_path(compose_config(config_name, overrides), overrides)
        config = to_container(compose_config(config_name, overrides))
        if same_config(job_dir / "results.json", config):
            print(f"fcil-sweep: skipping {job_dir} (results exist)", flush=True)
            return "skipped"
        error_file.unlink(missing_ok=True)
        if same_config(job_dir / STATE_FILE, config):  # an interrupted (or failed) job goes on from its checkpoint
            print(f"fcil-sweep: resuming {job_dir} from its checkpoint", flush=True)
            overrides.append(f"resume={quote_value(str(job_dir.resolve()))}")
        with tempfile.TemporaryDirectory(prefix="fcil-flwr-") as home:
            launch(config_name, overrides, site=FlowerSite.isolated(Path(home)))
        return "done"
    except Exception as exc:  # a failing job is recorded, the sweep goes on
        record = {
            "error": f"{type(exc).__name__}: {exc}",
            "overrides": overrides,
            "config": config,
            "traceback": traceback.format_exc(),
        }
        write_atomic(error_file, json.dumps(record, indent=2))
        print(f"fcil-sweep: job {job_dir} failed: {record['error']}", file=sys.stderr, flush=True)
        FAILED_JOBS.append(str(job_dir))
        return "failed"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def sweep_job(cfg: DictConfig) -> str:
    """One Hydra job: the composed ``cfg`` is rebuilt by every Flower process from the overrides."""
    hydra_cfg = HydraConfig.get()
    return run_job(hydra_cfg.job.config_name, list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))


def main() -> int:
    """Console entry point; exit code 1 when a job of an in-process sweep failed, 130/143 on SIGINT/SIGTERM."""
    with interruptible("fcil-sweep"):
        try:
            sweep_job()
        except Interrupted as exc:
            kept = f"{exc.output_dir} keeps its checkpoint; " if exc.resumable else ""
            print(f"fcil-sweep: interrupted; {kept}continue with: {shlex.join(['fcil-sweep', *sys.argv[1:]])}",
                  file=sys.stderr, flush=True)
            return exc.exit_code
    if FAILED_JOBS:
        print(f"fcil-sweep: {len(FAILED_JOBS)} job(s) failed, see error.json in: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
