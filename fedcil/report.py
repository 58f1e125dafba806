"""Reports over many runs: mean and standard deviation over seeds as a Markdown table, a CSV and plots.

    fcil-report multirun/ [more dirs or results.json files] [--out DIR]

Runs are grouped by method and by every config setting that differs between the runs
(seeds and output folders aside); each group reports mean and standard deviation over its
seeds. Failed sweep jobs (``error.json``) are listed under the table.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcil.files import atomic_file, write_atomic
from fedcil.results import draw_matrix, matrix_grid, save_figure

IGNORED_KEYS = ("seed", "output_dir", "method.name")
METRICS = ("faa", "aia", "forgetting", "up_kb", "down_kb", "wall_seconds")
HEADERS = {
    "faa": "FAA (%)", "aia": "AIA (%)", "forgetting": "forgetting", "up_kb": "up KB/client/round",
    "down_kb": "down KB/client/round", "wall_seconds": "wall (s)",
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def per_client_round_kb(results: dict, key: str) -> float:
    """Mean over rounds of bytes per participating client, in KB."""
    return float(np.mean([r[key] / max(r["clients"], 1) for r in results["rounds"]]) / 1000)


@dataclass
class Run:
    """One run's metrics and flattened config."""

    path: Path
    results: dict
    config: dict[str, Any] = field(init=False)
    metrics: dict[str, float | None] = field(init=False)

    def __post_init__(self) -> None:
        self.config = flatten(self.results["config"])
        self.metrics = {
            "faa": self.results["faa"],
            "aia": self.results["aia"],
            "forgetting": self.results["forgetting"],
            "up_kb": per_client_round_kb(self.results, "bytes_up"),
            "down_kb": per_client_round_kb(self.results, "bytes_down"),
            "wall_seconds": self.results["wall_seconds"],
        }


def find_files(paths: Iterable[Path], name: str) -> list[Path]:
    """Every ``name`` file at or below ``paths`` (sorted, no duplicates)."""
    found: set[Path] = set()
    for path in paths:
        if path.is_file() and path.name == name:
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(name))
    return sorted(found)


def setting_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between runs of one method, other than the seed and paths.

    A key that only follows the method (its own settings, or a method's fixed
    ``rounds_per_task``) says no more than the method column.
    """
    keys = sorted(set().union(*(r.config for r in runs)))
    methods = {r.config["method.name"] for r in runs}

    def varies(key: str) -> bool:
        return any(len({str(r.config.get(key)) for r in runs if r.config["method.name"] == m}) > 1 for m in methods)

    return [k for k in keys if k not in IGNORED_KEYS and varies(k)]


def group_runs(runs: list[Run]) -> tuple[list[str], dict[tuple, list[Run]]]:
    """Setting keys and the runs grouped by (method, setting values), in a stable order."""
    keys = setting_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        groups.setdefault((run.config["method.name"], *(run.config.get(k) for k in keys)), []).append(run)
    return keys, dict(sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])))


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` where undefined)."""
    data = [v for v in values if v is not None]
    if not data:
        return None, None
    return float(np.mean(data)), float(np.std(data, ddof=1)) if len(data) > 1 else None


def summarise(groups: dict[tuple, list[Run]]) -> list[dict[str, Any]]:
    """One row per group: its key, the number of seeds, and mean/std of each metric."""
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = {"key": key, "seeds": len(members)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([m.metrics[metric] for m in members])
        rows.append(row)
    return rows


def short(value: Any) -> str:
    """A setting for display: absolute paths shortened to their last two parts; unset as ``-``."""
    if value is None:
        return "-"
    text = str(value)
    return "/".join(Path(text).parts[-2:]) if text.startswith("/") else text


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(keys: list[str], rows: list[dict[str, Any]], failures: list[dict]) -> str:
    """The report as Markdown (mean ± std over seeds)."""
    header = ["method", *keys, "seeds", *(HEADERS[m] for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [short(v) for v in row["key"]] + [str(row["seeds"])]
        cells += [fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", f"Failed jobs ({len(failures)}):", ""]
        lines += [f"- `{f['path']}`: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    """The report as CSV, one column per statistic."""
    columns = ["method", *keys, "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([*row["key"], row["seeds"], *(row[c] for c in columns[len(keys) + 2 :])])


def label(key: tuple, keys: list[str], skip: str | None = None) -> str:
    """A group's legend entry: the method and its settings that are set (unset ones left out)."""
    parts = [str(key[0])] + [f"{k}={short(v)}" for k, v in zip(keys, key[1:]) if k != skip and v is not None]
    return " ".join(parts)


def save_with_legend(fig, ax, path: Path) -> None:
    """Save ``fig`` with ``ax``'s legend to the right of the plot, however many entries it has."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, path, bbox_inches="tight")


def plot_report(out: Path, keys: list[str], groups: dict[tuple, list[Run]]) -> list[str]:
    """FAA against beta, accuracy after each task, mean accuracy matrices; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "partition.beta" in keys:
        beta_at = keys.index("partition.beta") + 1
        name_at = keys.index("partition.name") + 1 if "partition.name" in keys else None
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for key, members in groups.items():
            if key[beta_at] is None or (name_at is not None and key[name_at] != "dirichlet"):
                continue  # beta only means something for the Dirichlet partition
            mean, std = mean_std([m.metrics["faa"] for m in members])
            lines.setdefault(label(key, keys, "partition.beta"), []).append((float(key[beta_at]), mean, std or 0.0))
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sorted(lines.items()):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", capsize=3, label=name)
        ax.set(xscale="log", xlabel="Dirichlet beta (smaller = more skewed)", ylabel="FAA (%)", title="FAA against beta")
        save_with_legend(fig, ax, out / "faa_vs_beta.png")
        written.append("faa_vs_beta.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, members in groups.items():
        curves = np.array([[np.nanmean(row[: t + 1]) for t, row in enumerate(matrix_grid(m.results["accuracy_matrix"]))]
                           for m in members])
        spread = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
        ax.errorbar(range(curves.shape[1]), curves.mean(axis=0), yerr=spread, marker="o", capsize=3,
                    label=label(key, keys))
        ax.set_xticks(range(curves.shape[1]))
    ax.set(xlabel="after training task", ylabel="mean accuracy on seen tasks (%)", ylim=(0, 100),
           title="accuracy after each task (mean ± std over seeds)")
    save_with_legend(fig, ax, out / "accuracy_per_task.png")
    written.append("accuracy_per_task.png")

    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, (key, members) in zip(axes.flat, groups.items()):
        mean = np.mean([matrix_grid(m.results["accuracy_matrix"]) for m in members], axis=0)
        draw_matrix(ax, mean, textwrap.fill(label(key, keys), 48))
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out / "accuracy_matrices.png")
    written.append("accuracy_matrices.png")
    return written


def build_report(paths: list[Path], out: Path) -> str:
    """Write report.md, report.csv and the plots into ``out``; return the Markdown."""
    runs = [Run(p.parent, json.loads(p.read_text())) for p in find_files(paths, "results.json")]
    failures = [{"path": str(p.parent), "error": json.loads(p.read_text())["error"]} for p in find_files(paths, "error.json")]
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    keys, groups = group_runs(runs)
    rows = summarise(groups)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(keys, rows, failures)
    write_atomic(out / "report.md", text)
    write_csv(out / "report.csv", keys, rows)
    plot_report(out, keys, groups)
    return text
