"""Checkpoints of a running experiment: written after every round, read back by ``resume``.

A checkpoint lives in the run's output folder as two files: ``checkpoint-<n>.safetensors``
(the strategy's tensors: adapters, head, residual bases, Gram sums) and ``checkpoint.json``
(the last finished task and round, the accuracy matrix and per-round records so far, the
server's random state (``null`` when ``dp.secret_sampling`` draws each round's clients from
the OS CSPRNG: no state to keep, none to leak the samples), the strategy's other values,
the config, and the tensors file's name). The tensors file is written first and
``checkpoint.json`` replaced atomically last, so a run killed at any moment leaves its
previous complete checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedcil.errors import ConfigError
from fedcil.files import atomic_file, write_atomic

if TYPE_CHECKING:
    from fedcil.protocol import TensorDict

STATE_FILE = "checkpoint.json"
IGNORED_KEYS = ("resume", "output_dir", "dp.max_epsilon")  # may differ between a run and its resumption (a budget may grow)


@dataclass
class Checkpoint:
    """Where a run stands after its last finished round, and what it needs to go on."""

    task: int
    round_in_task: int
    accuracy_matrix: list[list[float | None]]
    counts: list[int]
    rounds: list[dict]
    rng_state: dict | None
    values: dict
    config: dict
    tensors_file: str = ""

    def next_position(self, rounds_per_task: int) -> tuple[int, int]:
        """``(task, round)`` of the first round still to run."""
        if self.round_in_task + 1 < rounds_per_task:
            return self.task, self.round_in_task + 1
        return self.task + 1, 0


def save_checkpoint(folder: Path, checkpoint: Checkpoint, tensors: TensorDict) -> None:
    """Write ``tensors`` and ``checkpoint`` into ``folder``; drop the previous tensors file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{len(checkpoint.rounds)}.safetensors"
    with atomic_file(folder / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    checkpoint.tensors_file = name
    write_atomic(folder / STATE_FILE, json.dumps(asdict(checkpoint)))
    for old in folder.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(folder: Path) -> dict:
    """The JSON part of the checkpoint in ``folder`` (a clear error when there is none)."""
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"resume={str(folder)!r}: no {STATE_FILE} there (a run writes one after every round)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"resume={str(folder)!r}: {STATE_FILE} is not valid JSON ({exc})") from None


def compared(config: dict) -> dict:
    """``config`` without the :data:`IGNORED_KEYS` (dotted keys name a key inside a section)."""
    kept = copy.deepcopy(config)
    for key in IGNORED_KEYS:
        *sections, leaf = key.split(".")
        inner = kept
        for section in sections:
            inner = inner.get(section, {})
        inner.pop(leaf, None)
    return kept


def load_checkpoint(folder: Path, config: dict) -> tuple[Checkpoint, TensorDict]:
    """The checkpoint in ``folder`` and its tensors; it must have been written with ``config``."""
    from safetensors.torch import load_file

    checkpoint = Checkpoint(**read_state(folder))
    ours, theirs = compared(config), compared(checkpoint.config)
    differing = sorted(key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key))
    if differing:
        raise ConfigError(
            f"resume={str(folder)!r}: the checkpoint was written with other settings of {', '.join(differing)}; "
            "resume with the same config"
        )
    return checkpoint, load_file(str(folder / checkpoint.tensors_file))
