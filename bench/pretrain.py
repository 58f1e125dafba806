"""Self-supervised pretraining against its targets: wall time and linear-probe accuracy.

    .venv/bin/python -m bench.pretrain [overrides]     # default: experiment=fmnist_ssl

Pretrains from scratch into a temporary cache (never reusing a checkpoint), then prints
the wall time, the linear-probe accuracy of the pretrained and of the random backbone, and
whether the targets are met; writes ``bench/results/pretrain-<time>.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime

from bench.overhead import RESULTS_DIR
from fedcil.config import compose_config
from fedcil.ssl import ensure_pretrained

TARGETS = {"wall_minutes": 20.0, "probe_accuracy": 80.0}


def main(argv: list[str] | None = None) -> int:
    overrides = list(argv if argv is not None else sys.argv[1:]) or ["experiment=fmnist_ssl"]
    with tempfile.TemporaryDirectory(prefix="fcil-pretrain-bench-") as cache:
        cfg = compose_config("config", [*overrides, f"pretrain.cache_dir={cache}"])
        started = time.monotonic()
        result = ensure_pretrained(cfg, log=lambda m: print(m, flush=True))
        wall = time.monotonic() - started
    report = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "overrides": overrides,
        "wall_minutes": wall / 60,
        "training_minutes": result.settings["wall_seconds"] / 60,
        "probe_accuracy": result.settings["linear_probe_accuracy"],
        "random_init_probe_accuracy": result.settings["random_init_probe_accuracy"],
        "epoch_losses": result.settings["epoch_losses"],
    }
    print(f"wall {report['wall_minutes']:.1f} min (training {report['training_minutes']:.1f} min), target <= "
          f"{TARGETS['wall_minutes']:.0f}: {'met' if report['wall_minutes'] <= TARGETS['wall_minutes'] else 'MISSED'}")
    print(f"linear probe {report['probe_accuracy']:.2f}% (random backbone {report['random_init_probe_accuracy']:.2f}%), "
          f"target >= {TARGETS['probe_accuracy']:.0f}%: {'met' if report['probe_accuracy'] >= TARGETS['probe_accuracy'] else 'MISSED'}")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"pretrain-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
