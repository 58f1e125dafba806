"""Peak memory of a process tree, sampled in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil


def tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and all its descendants (those still alive)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def proportional_set_size(proc: psutil.Process) -> int:
    """PSS in bytes (shared pages split between the processes that map them); RSS if unavailable."""
    try:
        info = proc.memory_full_info()
        return getattr(info, "pss", info.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


class PeakMemory:
    """Context manager: the peak total PSS of this process's tree plus extra roots' trees.

    ``extra_roots`` is called at every sample, so processes that start detached later
    (a local SuperLink) are found once they exist.
    """

    def __init__(self, extra_roots: Callable[[], list[psutil.Process]] = list, interval: float = 0.25) -> None:
        self.extra_roots = extra_roots
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        procs = {p.pid: p for root in [psutil.Process(), *self.extra_roots()] for p in tree(root)}
        return sum(proportional_set_size(p) for p in procs.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
