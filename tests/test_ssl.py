"""Self-supervised pretraining: augmentation, loss, label-blindness, checkpoint and cache."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedcil.config import compose_config
from fedcil.data import ArrayDataset, ImageData, load_dataset
from fedcil.errors import ConfigError
from fedcil.model import build_model, create_backbone
from fedcil.ssl import CHECKPOINT, SETTINGS, checkpoint_dir, ensure_pretrained, nt_xent, pretrain, random_views

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
TINY = ["experiment=fmnist_ssl", "pretrain.epochs=6", "pretrain.batch_size=64", "pretrain.warmup_epochs=0",
        "pretrain.hidden_dim=64", "pretrain.projection_dim=32", "model.kwargs.embed_dim=32", "model.kwargs.depth=2"]


def tiny_data(seed: int = 0, n: int = 256) -> ImageData:
    """Fashion-MNIST-shaped images with structure to learn: bright squares at class positions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
    for i, cls in enumerate(y):
        r, c = divmod(int(cls), 2)
        images[i, 0, 14 * r : 14 * r + 10, 14 * c : 14 * c + 10] = 230
    tensor = torch.from_numpy(images)
    return ImageData(ArrayDataset(tensor, y, 1 / 255), ArrayDataset(tensor[:64], y[:64], 1 / 255), y, y[:64], 4, 1, 28)


def cfg_for(tmp_path, *extra: str):
    return compose_config("config", [*TINY, f"pretrain.cache_dir={tmp_path}", *extra])


def test_views_are_identity_without_augmentation_and_random_with_it():
    images = torch.rand(6, 1, 28, 28)
    still = OmegaConf.create({"crop_scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip": False, "brightness": 0.0, "contrast": 0.0})
    torch.testing.assert_close(random_views(images, still, torch.Generator().manual_seed(0)), images, atol=1e-5, rtol=0)
    aug = compose_config("config", []).pretrain.augment
    a = random_views(images, aug, torch.Generator().manual_seed(1))
    b = random_views(images, aug, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, random_views(images, aug, torch.Generator().manual_seed(2)))


def test_nt_xent_matches_a_loop_over_anchors():
    z1, z2, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1).numpy()
    losses = []
    for i in range(10):
        positive = (i + 5) % 10
        sims = {k: math.exp(float(z[i] @ z[k]) / t) for k in range(10) if k != i}
        losses.append(-math.log(sims[positive] / sum(sims.values())))
    assert nt_xent(z1, z2, t).item() == pytest.approx(np.mean(losses), rel=1e-9)


def test_pretraining_learns_writes_a_loadable_checkpoint_and_ignores_labels(tmp_path):
    cfg = cfg_for(tmp_path)
    data = tiny_data()
    settings = pretrain(cfg, data, tmp_path / "a", log=lambda m: None)
    losses = settings["epoch_losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # labels are never read: other labels give the bit-identical checkpoint
    other = np.random.default_rng(9).permutation(data.train_labels)
    images = data.train.images
    shuffled = ImageData(ArrayDataset(images, other, 1 / 255), ArrayDataset(images[:64], other[:64], 1 / 255),
                         other, other[:64], 4, 1, 28)
    pretrain(cfg, shuffled, tmp_path / "b", log=lambda m: None)
    a, b = (tmp_path / "a" / CHECKPOINT).read_bytes(), (tmp_path / "b" / CHECKPOINT).read_bytes()
    assert a == b
    # the checkpoint loads back bit-identically into the model used for FCIL
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / CHECKPOINT))
    loaded_cfg = OmegaConf.merge(cfg.model, {"pretrained_path": str(tmp_path / "a" / CHECKPOINT)})
    model = build_model(loaded_cfg, cfg.lora, 10, 1, 28, seed=cfg.seed)
    own = {k.replace(".base_layer.", "."): v for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)
    # a checkpoint of another shape fails with a clear error
    wider = OmegaConf.merge(loaded_cfg, {"kwargs": {"embed_dim": 48}})
    with pytest.raises(ConfigError, match="does not match model"):
        build_model(wider, cfg.lora, 10, 1, 28, seed=cfg.seed)


def test_ssl_without_a_checkpoint_path_is_a_clear_error(tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(ConfigError, match="model.ssl=true needs model.pretrained_path"):
        build_model(cfg.model, cfg.lora, 10, 1, 28, seed=0)


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_cache_is_reused_for_the_same_settings_and_data_only(tmp_path):
    cfg = cfg_for(tmp_path, "pretrain.epochs=1", "pretrain.max_images=256")
    first = ensure_pretrained(cfg, log=lambda m: None)
    assert not first.reused and first.path.is_file()
    assert json.loads((first.path.parent / SETTINGS).read_text())["images"] == 256
    # the experiment's seed and federation do not matter; pretraining settings and data do
    again = ensure_pretrained(cfg_for(tmp_path, "pretrain.epochs=1", "pretrain.max_images=256", "seed=5", "num_clients=3"),
                              log=lambda m: None)
    assert again.reused and again.path == first.path
    data = load_dataset(cfg.dataset)
    assert checkpoint_dir(cfg_for(tmp_path, "pretrain.epochs=2", "pretrain.max_images=256"), data) != first.path.parent
    assert checkpoint_dir(cfg, tiny_data()) != first.path.parent


def test_fcil_pretrain_retrain_trains_anew_instead_of_returning_the_shipped_file(tmp_path, monkeypatch, capsys):
    """The reproduce command (``fcil-pretrain --retrain``) pretrains even where a checkpoint is shipped for
    its settings; without ``--retrain`` the shipped file is what comes back."""
    from safetensors.torch import save_file

    from fedcil import ssl
    from fedcil.cli.pretrain import main

    overrides = ["experiment=digits_ssl", "pretrain.epochs=1", "pretrain.max_images=128", "pretrain.batch_size=64",
                 "pretrain.hidden_dim=32", "pretrain.projection_dim=16", "model.kwargs.embed_dim=32",
                 "model.kwargs.depth=1", f"pretrain.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config("config", overrides)
    data = load_dataset(cfg.dataset)
    shipped = tmp_path / "pretrained" / checkpoint_dir(cfg, data).name  # the repository's pretrained/ for these settings
    untrained = create_backbone(OmegaConf.merge(cfg.model, {"ssl": False}), data.in_chans, data.image_size)
    shipped.mkdir(parents=True)
    save_file(untrained.state_dict(), str(shipped / CHECKPOINT))
    (shipped / SETTINGS).write_text(json.dumps({"sha256": ssl.file_sha256(shipped / CHECKPOINT),
                                                "linear_probe_accuracy": 12.5}))
    monkeypatch.setattr(ssl, "SHIPPED_DIR", tmp_path / "pretrained")
    assert main(overrides) == 0
    assert f"checkpoint {shipped / CHECKPOINT} " in capsys.readouterr().out
    shipped_written = (shipped / CHECKPOINT).stat().st_mtime_ns
    assert main(["--retrain", *overrides]) == 0
    out = capsys.readouterr().out
    fresh = checkpoint_dir(cfg, data) / CHECKPOINT
    assert f"checkpoint {fresh} " in out and "pretrain: epoch 1/1 loss" in out and "reusing" not in out
    assert fresh.is_file() and fresh.stat().st_mtime_ns >= shipped_written
    assert f"the shipped {shipped / CHECKPOINT} has linear probe 12.50%" in out and "other bytes" in out
    recorded = json.loads((fresh.parent / SETTINGS).read_text())
    assert recorded["sha256"] == ssl.file_sha256(fresh) and recorded["images"] == 128
