"""Update-size bounds for the averaging methods (server_app/update_bounds.py), as maths and as real runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcil.cli.inprocess import inprocess_post
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.protocol import ClientUpdate
from fedcil.settings import check_settings
from server_app.loop import run_rounds
from server_app.update_bounds import bound_update_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent / "adversarial_app"))
from dishonest import lie  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "simclr-13e261fc37a457be" / "backbone.safetensors"
SHAPES = {"head.weight": (3, 4), "head.bias": (3,), "lora_A": (2, 4)}


def random_round(seed: int, counts: list[int], scales: list[float]) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    """A sent state and one reply per count, each update drawn at its own scale."""
    generator = torch.Generator().manual_seed(seed)
    sent = {k: torch.randn(shape, generator=generator) for k, shape in SHAPES.items()}
    updates = [
        ClientUpdate(node, {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in sent.items()}, n, 0.0)
        for node, (n, scale) in enumerate(zip(counts, scales, strict=True))
    ]
    return sent, updates


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), counts=st.lists(st.integers(0, 50), min_size=1, max_size=8),
       factor=st.floats(1.0, 5.0), spread=st.floats(0.0, 3.0), batch=st.integers(1, 16))
def test_every_update_ends_within_the_factor_of_the_median_per_step_along_its_own_direction(seed, counts, factor, spread, batch):
    """Against numpy: each tensor's update norm is at most ``factor`` x the median of norm / sqrt(local steps)
    (over replies with data) x the reply's own sqrt(steps); an update within it is untouched, one above
    keeps its direction; replies without data are untouched."""
    scales = [10.0 ** (spread * ((i * 7919) % 5 - 2) / 2) for i in range(len(counts))]
    sent, updates = random_round(seed, counts, scales)
    epochs = 2
    bounded, notes = bound_update_sizes(updates, sent, factor, epochs, batch)
    steps = [np.sqrt(epochs * max(1, -(-n // batch))) for n in counts]
    for key in SHAPES:
        norms = [np.linalg.norm((u.tensors[key] - sent[key]).double().numpy()) for u in updates]
        per_step = [norm / s for norm, s, n in zip(norms, steps, counts) if n > 0]
        median = float(np.median(per_step)) if per_step else np.inf
        for before, after, s in zip(updates, bounded, steps, strict=True):
            old, new = (before.tensors[key] - sent[key]).double(), (after.tensors[key] - sent[key]).double()
            limit = factor * median * s
            if before.num_examples > 0 and abs(float(old.norm()) - limit) <= 1e-9 * limit:
                continue  # on the bound: either side of float rounding
            if before.num_examples == 0 or float(old.norm()) <= limit:
                assert torch.equal(after.tensors[key], before.tensors[key])
            else:
                assert float(new.norm()) == pytest.approx(limit, rel=1e-5)
                assert float(torch.nn.functional.cosine_similarity(old.flatten(), new.flatten(), dim=0)) > 1 - 1e-5
                assert before.node_id in notes and "update_factor" in notes[before.node_id]
    assert [u.num_examples for u in bounded] == counts


def test_secure_aggregation_and_dp_refuse_a_bound_they_cannot_keep():
    """secagg hides each update; dp's sensitivity does not hold when the median moves every client's bound."""
    with pytest.raises(ConfigError, match="replies.update_factor=3 .* set replies.update_factor=null or secagg"):
        check_settings(compose_config("config", ["method=fedavg_lora", "secagg.enabled=true", "replies.weighting=claimed"]))
    with pytest.raises(ConfigError, match="dp.enabled=true with replies.update_factor=3; allowed: null"):
        check_settings(compose_config("config", ["method=fedavg_lora", "dp.enabled=true", "replies.clip_norm=1",
                                                 "replies.weighting=uniform"]))


QUICK = ["experiment=quickstart", f"model.pretrained_path={PRETRAINED}", "method=fedavg_lora", "num_tasks=2",
         "rounds_per_task=3", "local_epochs=2"]


def run(tmp_path: Path, attack: str | None, *extra: str) -> dict:
    """FedAvg-LoRA on the shipped digits backbone; client 0 sends every training reply as ``attack`` lies."""
    cfg = compose_config("config", [*QUICK, *extra, f"output_dir={tmp_path / f'{attack}{len(extra)}'}"])
    honest = inprocess_post(cfg)

    def post(contents, kind):
        result = honest(contents, kind)
        if kind == MessageType.TRAIN and attack:
            result.replies = [(n, lie(c, attack, cfg.replies.max_examples) if n == 0 else c) for n, c in result.replies]
        return result

    return run_rounds(post, list(range(cfg.num_clients)), cfg)


def test_a_poisoned_head_with_the_largest_claim_is_cut_back_to_the_honest_update_size(tmp_path):
    """Client 0 claims 10^7 examples and adds 10 to one class's head bias (tests/adversarial_app/dishonest.py).

    Its claim is capped (the weighting), but without the update bound its head wins every
    prediction. Measured (2-core CPU): 71.1 honest, 9.8 unbounded, 70.7 bounded. Tolerance: 5 points
    of FAA; the unbounded attack must cost at least 20. The honest run is never cut.
    """
    honest = run(tmp_path, None)
    assert abs(run(tmp_path, None, "replies.update_factor=null")["faa"] - honest["faa"]) < 0.5
    unbounded = run(tmp_path, "poison_head", "replies.update_factor=null")
    defended = run(tmp_path, "poison_head")
    assert unbounded["faa"] < honest["faa"] - 20
    assert abs(defended["faa"] - honest["faa"]) < 5
    assert all("largest head.bias" in r["capped"]["0"] for r in defended["rounds"])
