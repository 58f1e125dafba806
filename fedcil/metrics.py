"""Class-incremental metrics from the accuracy matrix (FAA, AIA, forgetting, BWT; see docs/methods.md).

``acc[t][i]`` is the accuracy (percent) on task ``i``'s test classes after training task
``t``, predicting over every class seen up to ``t``; entries with ``i > t`` are ``None``.
"""

from __future__ import annotations

import numpy as np


def _row(acc: list[list[float | None]], t: int) -> np.ndarray:
    return np.array([acc[t][i] for i in range(t + 1)], dtype=float)


def final_average_accuracy(acc: list[list[float | None]]) -> float:
    """FAA: mean over tasks of the accuracy after the last task."""
    return float(_row(acc, len(acc) - 1).mean())


def weighted_final_accuracy(acc: list[list[float | None]], counts: list[int]) -> float:
    """Accuracy over all test samples seen after the last task (tasks weighted by size)."""
    row = _row(acc, len(acc) - 1)
    return float(np.average(row, weights=np.asarray(counts[: len(row)], dtype=float)))


def average_incremental_accuracy(acc: list[list[float | None]]) -> float:
    """AIA: mean over steps ``t`` of the mean accuracy on tasks ``0..t``."""
    return float(np.mean([_row(acc, t).mean() for t in range(len(acc))]))


def forgetting(acc: list[list[float | None]]) -> float | None:
    """Mean over old tasks of (best earlier accuracy - final accuracy); ``None`` for one task."""
    last = len(acc) - 1
    if last == 0:
        return None
    drops = [max(acc[t][i] for t in range(i, last)) - acc[last][i] for i in range(last)]
    return float(np.mean(drops))


def backward_transfer(acc: list[list[float | None]]) -> float | None:
    """BWT: mean over old tasks of (final accuracy - accuracy right after learning it)."""
    last = len(acc) - 1
    if last == 0:
        return None
    return float(np.mean([acc[last][i] - acc[i][i] for i in range(last)]))


def summary(acc: list[list[float | None]], counts: list[int]) -> dict[str, float | None]:
    """Every scalar metric of an accuracy matrix, under the results.json keys."""
    return {
        "faa": final_average_accuracy(acc),
        "faa_weighted": weighted_final_accuracy(acc, counts),
        "aia": average_incremental_accuracy(acc),
        "forgetting": forgetting(acc),
        "bwt": backward_transfer(acc),
    }
