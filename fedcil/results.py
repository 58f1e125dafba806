"""Results files of one run: ``results.json``, ``rounds.csv`` and two PNG plots."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedcil.files import atomic_file, write_atomic

ROUND_FIELDS = ("task", "round", "clients", "loss", "accuracy", "bytes_up", "bytes_down", "seconds")


def default_output_dir(cfg: DictConfig, root: Path) -> Path:
    """``<root>/outputs/<date-time>_<method>_<dataset>_s<seed>`` (absolute)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root.resolve() / "outputs" / f"{stamp}_{cfg.method.name}_{cfg.dataset.name}_s{cfg.seed}"


def resolve_output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else ``cfg.resume`` (absolute paths), else a new folder under ``<cwd>/outputs``."""
    from fedcil.errors import ConfigError

    for key in ("output_dir", "resume"):
        if cfg[key]:
            path = Path(cfg[key])
            if not path.is_absolute():
                raise ConfigError(f"{key}={cfg[key]!r} must be an absolute path")
            return path
    return default_output_dir(cfg, Path.cwd())


def save_figure(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` to ``path`` atomically, then close the figure."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, **kwargs)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def privacy_spent(rounds: list[dict], privacy: dict | None = None) -> dict[str, Any]:
    """A differentially private run's ``epsilon`` and ``delta`` (its last round's) and, next to them, ``dp``:
    the noise's source, reproducibility and the amplification credited (nothing for other runs)."""
    spent = {key: rounds[-1][key] for key in ("epsilon", "delta") if rounds and key in rounds[-1]}
    return spent | ({"dp": privacy} if privacy else {})


def backbone_weights(cfg: DictConfig) -> dict[str, Any]:
    """Which weights the run's backbone had: the checkpoint file (absolute path and SHA-256), timm's hub
    weights of ``model.name``, or a random initialisation from the run's seed."""
    from fedcil.ssl import file_sha256

    if cfg.model.pretrained_path:
        file = Path(cfg.model.pretrained_path).expanduser().resolve()
        return {"weights": "file", "path": str(file), "sha256": file_sha256(file)}
    if cfg.model.pretrained:
        return {"weights": "hub", "name": cfg.model.name}
    return {"weights": "random", "seed": cfg.seed}


def build_results(
    cfg: DictConfig,
    accuracy_matrix: list[list[float | None]],
    counts: list[int],
    rounds: list[dict],
    wall_seconds: float,
    started_at: float,
    setup_seconds: float,
    privacy: dict | None = None,
) -> dict[str, Any]:
    """The results.json content of one run (every method, federated or not); ``backbone``: which weights the
    backbone had (:func:`backbone_weights`); ``privacy``: a DP run's ``dp``."""
    from fedcil.config import to_container
    from fedcil.metrics import summary

    return {
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "num_tasks": len(accuracy_matrix),
        "num_clients": cfg.num_clients,
        "backbone": backbone_weights(cfg),
        "accuracy_matrix": accuracy_matrix,
        **summary(accuracy_matrix, counts),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        **privacy_spent(rounds, privacy),
        "rounds": rounds,
        "wall_seconds": wall_seconds,
        "started_at": started_at,
        "setup_seconds": setup_seconds,
        "config": to_container(cfg),
    }


def finish_run(
    cfg: DictConfig,
    output_dir: Path,
    accuracy_matrix: list[list[float | None]],
    counts: list[int],
    rounds: list[dict],
    timing: tuple[float, float, float],
    log: Callable[[str], None],
    diagnostics: dict | None = None,
    privacy: dict | None = None,
) -> dict[str, Any]:
    """The end of every run (federated or ``joint``): build the record, write the files, print the table.

    ``timing`` is ``(started, started_at, setup_seconds)``: ``time.monotonic()`` and
    ``time.time()`` at the start, and the seconds before the first round. ``diagnostics``
    (per-task accuracies of other views of the final model) go into ``results.json``, and so does
    ``privacy`` (a DP run's ``dp``: :meth:`server_app.privacy.CentralPrivacy.summary`).
    """
    from fedcil.metrics import summary

    started, started_at, setup_seconds = timing
    results = build_results(cfg, accuracy_matrix, counts, rounds, time.monotonic() - started, started_at, setup_seconds, privacy)
    results["diagnostics"] = diagnostics or {}
    write_results(output_dir, results)
    log(f"accuracy (%) per task:\n{format_accuracy_table(accuracy_matrix, summary(accuracy_matrix, counts))}")
    log(f"results written to {output_dir}")
    return results


def write_results(output_dir: Path, results: dict[str, Any]) -> None:
    """Write results.json, rounds.csv, accuracy_matrix.png and accuracy_per_task.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "results.json", json.dumps(_json_safe(results), indent=2))
    rows = [{k: r.get(k) for k in ROUND_FIELDS} for r in results["rounds"]]
    with atomic_file(output_dir / "rounds.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROUND_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_accuracy(output_dir, results["accuracy_matrix"], f"{results['method']} on {results['dataset']}")


def matrix_grid(acc: list[list[float | None]]):
    """The accuracy matrix as a float array with NaN above the diagonal."""
    import numpy as np

    return np.array([[np.nan if v is None else v for v in row] for row in acc], dtype=float)


def draw_matrix(ax, grid, title: str) -> object:
    """Heat map of one accuracy matrix (rows: after task t; columns: task i) on ``ax``."""
    num = len(grid)
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for t in range(num):
        for i in range(t + 1):
            ax.text(i, t, f"{grid[t, i]:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set(xlabel="evaluated task i", ylabel="after training task t", title=title)
    ax.set_xticks(range(num))
    ax.set_yticks(range(num))
    return image


def plot_accuracy(output_dir: Path, acc: list[list[float | None]], title: str) -> None:
    """Heat map of the accuracy matrix and curves of each task's accuracy over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = matrix_grid(acc)
    num = len(grid)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * num, 1.0 + 0.6 * num))
    fig.colorbar(draw_matrix(ax, grid, title), ax=ax, label="accuracy (%)")
    fig.tight_layout()
    save_figure(fig, output_dir / "accuracy_matrix.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for i in range(num):
        ax.plot(range(i, num), grid[i:, i], marker="o", label=f"task {i}")
    ax.plot(range(num), [np.nanmean(grid[t, : t + 1]) for t in range(num)], "k--", lw=2, label="mean of seen")
    ax.set(xlabel="after training task", ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.set_xticks(range(num))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, output_dir / "accuracy_per_task.png")


def format_accuracy_table(acc: list[list[float | None]], metrics: dict[str, float | None]) -> str:
    """The accuracy matrix and the summary metrics as a plain-text table."""
    num = len(acc)
    lines = ["after task | " + " ".join(f"T{i:<5}" for i in range(num)) + " | mean"]
    for t, row in enumerate(acc):
        cells = " ".join(f"{v:5.1f} " if v is not None else "   -  " for v in row)
        seen = [v for v in row if v is not None]
        lines.append(f"{t:>10} | {cells}| {sum(seen) / len(seen):5.1f}")
    lines.append(
        " ".join(f"{k.upper()} {v:.2f}" if v is not None else f"{k.upper()} n/a" for k, v in metrics.items())
    )
    return "\n".join(lines)
