"""The LoRM authors' training protocol as settings: augmentation (training and Gram pass),
AdamW, timm's head initialisation, mixed precision on CUDA; hub weights that cannot be had.
(Its settings' ranges and choices are checked in test_config.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from client_app.local_round import run_local_round
from fedcil.augment import CropFlip
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.model import build_model
from fedcil.protocol import TrainRequest
from fedcil.training import TrainSettings, autocast_dtype, make_optimizer


def test_crop_flip_is_seeded_and_the_identity_when_it_may_not_change_anything():
    images = torch.rand(5, 1, 8, 8)
    identity = CropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(identity(images, torch.Generator().manual_seed(0)), images, rtol=0, atol=1e-6)
    crop = CropFlip()
    first, again = (crop(images, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, again) and not torch.allclose(first, images)
    assert first.shape == images.shape and 0 <= float(first.min()) and float(first.max()) <= 1


def test_flip_alone_mirrors_about_half_the_images():
    images = torch.rand(400, 1, 4, 4)
    views = CropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)(images, torch.Generator().manual_seed(1))
    mirrored = [torch.allclose(v, i.flip(-1), atol=1e-6) for v, i in zip(views, images)]
    assert 150 < sum(mirrored) < 250


def test_precision_autocasts_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype("bf16", cuda) == torch.bfloat16 and autocast_dtype("fp16", cuda) == torch.float16
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("fp16", cpu) is None
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        autocast_dtype("fp8", cuda)


def test_adamw_with_weight_decay():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([param], TrainSettings(epochs=1, batch_size=1, lr=0.1, optimizer="adamw", weight_decay=0.5))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.5


def test_timm_head_init_is_a_truncated_normal_with_zero_bias(cfg):
    """timm's (and torch's) truncation is at +-2 absolute: with std 0.02 a plain N(0, 0.02^2) in effect."""
    head = build_model(OmegaConf.merge(cfg.model, {"head_init": "timm"}), cfg.lora, 100, 1, 8, seed=0).head
    weight = head.weight.detach()
    assert not head.bias.detach().any() and float(weight.abs().max()) < 0.2
    assert float(weight.std()) == pytest.approx(0.02, rel=0.05) and abs(float(weight.mean())) < 0.002
    default = build_model(cfg.model, cfg.lora, 100, 1, 8, seed=0).head  # torch: uniform(+-1/sqrt(64)), a bias too
    assert default.bias.detach().any() and float(default.weight.detach().abs().max()) > 0.1


def client_round(cfg, state, groups=("lora_B", "head")):
    request = TrainRequest(task=0, round_in_task=0, state=state, train_groups=groups, extra={"statistics": "lorm"} if "lorm" in cfg.method.name else {})
    return run_local_round(cfg, request, 0, cfg.num_clients)


@pytest.mark.parametrize("method", ["fedavg_lora", "lorm"])
def test_augmentation_changes_training_and_grams_reproducibly(method):
    base = [f"method={method}", "num_tasks=5", "local_epochs=1"]
    plain, augmented = (compose_config("config", [*base, f"augment.enabled={on}"]) for on in ("false", "true"))
    state = build_model(plain.model, plain.lora, 10, 1, 8, seed=0).initial_state
    without, with_views, again = client_round(plain, state)[0], client_round(augmented, state)[0], client_round(augmented, state)[0]
    assert all(torch.equal(with_views[k], again[k]) for k in with_views)
    assert any(not torch.equal(with_views[k], without[k]) for k in with_views)
    if method == "lorm":  # the Gram pass sees augmented images only with augment.in_grams
        no_gram_views = compose_config("config", [*base, "augment.enabled=true", "augment.in_grams=false"])
        reply = client_round(no_gram_views, state)[0]
        gram = next(k for k in reply if k.endswith(".S"))
        assert not torch.equal(reply[gram], with_views[gram])


def test_the_lorm_presets_follow_the_authors_protocol():
    for preset in ("lorm_cifar100", "lorm_imagenet_r", "fmnist_lorm"):
        cfg = compose_config("config", [f"experiment={preset}"])
        assert cfg.lora.alpha == cfg.lora.rank  # no LoRA scaling: W0 + B A
        assert (cfg.optimizer, cfg.weight_decay, cfg.lr, cfg.batch_size) == ("adamw", 0.0, 0.003, 16)
        assert (cfg.rounds_per_task, cfg.local_epochs, cfg.model.head_init) == (5, 5, "timm")
        assert cfg.augment.enabled and cfg.augment.in_grams and cfg.method.name == "lorm"
    assert compose_config("config", ["experiment=fmnist_lorm"]).lora.rank == 1


def test_hub_weights_that_cannot_be_fetched_are_one_line_naming_the_local_path():
    """As on a machine without the hub (offline mode: no retries): one line, not a traceback."""
    code = (
        "from fedcil.config import compose_config; from fedcil.model import create_backbone\n"
        "create_backbone(compose_config('config', ['model=vit_b16']).model, 3, 32)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    error = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and error.startswith("fedcil.errors.ConfigError: model.pretrained=true")
    assert "could not be fetched" in error and "model.pretrained_path=" in error
