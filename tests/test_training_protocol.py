"""The LoRM authors' training protocol as settings: augmentation (training and Gram pass),
AdamW, timm's head initialisation, mixed precision on CUDA; hub weights that cannot be had.
(Its settings' ranges and choices are checked in test_config.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from client_app.local_round import run_local_round
from fedcil.augment import CropFlip
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.experiment import experiment_for
from fedcil.gram import compute_grams
from fedcil.model import adapted_layers, build_model, model_for, set_base_deltas, set_sent_state
from fedcil.protocol import GRAM_ADAPTER_SCALE, TrainRequest, unpack_base
from strategies.base import lora_scaling
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


def test_a_clients_grams_are_taken_under_the_requests_gram_model_and_leave_its_model_as_it_was():
    """The end-of-task Grams under ``gram_base`` and ``gram_adapter_scale`` c equal those of a model whose frozen
    weights are W0 + gram base + c s B A written out (adapter off); afterwards the cached model computes as before."""
    cfg = compose_config("config", ["method=lorm", "method.gram_alpha=1.0"])
    experiment = experiment_for(cfg)
    model = model_for(cfg, experiment.data.num_classes, experiment.data.in_chans, experiment.data.image_size)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in model.initial_state.items()}
    layers = sorted(adapted_layers(model))
    gram_base = {f"{layer}.{part}": torch.randn(shape, generator=generator) * 0.05 for layer in layers
                 for part, shape in (("U", (adapted_layers(model)[layer].base_layer.out_features, 3)),
                                     ("V", (3, adapted_layers(model)[layer].base_layer.in_features)))}
    scale, scaling = 0.25, lora_scaling(cfg.lora)
    request = TrainRequest(task=1, round_in_task=0, state=state, train_groups=(), extra={"statistics": "gram", GRAM_ADAPTER_SCALE: scale},
                           gram_base=gram_base)
    images = torch.rand(3, 1, 8, 8)
    set_sent_state(model, state)
    set_base_deltas(model, {})
    before = model(images)
    reply = run_local_round(cfg, request, 0, cfg.num_clients)[0]
    torch.testing.assert_close(model(images), before)  # base and adapter scaling restored
    written_out = {layer: unpack_base(gram_base)[layer] + scale * scaling * state[f"{layer}.lora_B"] @ state[f"{layer}.lora_A"]
                   for layer in layers}
    set_sent_state(model, {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in state.items()})
    set_base_deltas(model, written_out)
    expected = compute_grams(model, adapted_layers(model), {layer: 1.0 for layer in layers}, experiment.data.train,
                             experiment.client_indices(1, 0), cfg.eval_batch_size, torch.device("cpu"))
    set_base_deltas(model, {})
    for layer in layers:
        torch.testing.assert_close(reply[f"{layer}.G"].double(), expected[layer], rtol=1e-4, atol=1e-3)
    plain = run_local_round(cfg, TrainRequest(1, 0, state, (), {"statistics": "gram"}), 0, cfg.num_clients)[0]
    assert not torch.allclose(plain[f"{layers[0]}.G"], reply[f"{layers[0]}.G"], rtol=1e-3)


def test_repeated_gram_passes_average_fresh_views():
    """``passes`` passes equal the mean of as many single passes drawing views from the same stream."""
    cfg = compose_config("config", [])
    model = build_model(cfg.model, cfg.lora, 10, 1, 8, seed=0)
    dataset = torch.utils.data.TensorDataset(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))
    layers, crop = adapted_layers(model), CropFlip()

    def grams(passes: int, generator: torch.Generator) -> dict:
        views = lambda images: crop(images, generator)  # noqa: E731
        return compute_grams(model, layers, {n: 0.0 for n in layers}, dataset, np.arange(6), 4, torch.device("cpu"), views, passes)

    twice = grams(2, torch.Generator().manual_seed(7))
    stream = torch.Generator().manual_seed(7)
    first, second = grams(1, stream), grams(1, stream)
    assert not torch.allclose(first[next(iter(layers))], second[next(iter(layers))])
    for name in layers:
        torch.testing.assert_close(twice[name], (first[name] + second[name]) / 2)
    unviewed = compute_grams(model, layers, {n: 0.0 for n in layers}, dataset, np.arange(6), 4, torch.device("cpu"), None, 3)
    single = compute_grams(model, layers, {n: 0.0 for n in layers}, dataset, np.arange(6), 4, torch.device("cpu"))
    assert all(torch.equal(unviewed[n], single[n]) for n in layers)


def test_the_lorm_presets_follow_the_authors_protocol():
    for preset in ("lorm_cifar100", "lorm_imagenet_r", "lorm_tiny_imagenet", "fmnist_lorm"):
        cfg = compose_config("config", [f"experiment={preset}"])
        assert cfg.lora.alpha == cfg.lora.rank  # no LoRA scaling: W0 + B A
        assert (cfg.optimizer, cfg.weight_decay, cfg.lr, cfg.batch_size) == ("adamw", 0.0, 0.003, 16)
        assert (cfg.rounds_per_task, cfg.local_epochs, cfg.model.head_init) == (5, 5, "timm")
        assert cfg.augment.enabled and cfg.augment.in_grams and cfg.method.name == "lorm"
        assert cfg.method.gram_model == "running_average"
    assert compose_config("config", ["experiment=fmnist_lorm"]).lora.rank == 1
    assert compose_config("config", ["experiment=fmnist_lorm", "method.gram_model=own"]).method.gram_model == "own"
    assert compose_config("config", ["method=lorm"]).method.gram_model == "own"


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
