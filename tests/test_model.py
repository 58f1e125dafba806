"""Frozen timm ViT + PEFT LoRA + head: what trains, what stays, what the adapter computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from client_app.local_round import run_local_round
from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.experiment import experiment_for
from fedcil.model import (
    adapted_layers,
    build_model,
    get_trainable_state,
    lora_target_regex,
    model_for,
    resolve_device,
    set_base_deltas,
    set_trainable_state,
    trainable_parameters,
)
from fedcil.protocol import TrainRequest, param_group
from strategies.base import lora_scaling


def make(cfg, **lora):
    lora_cfg = OmegaConf.merge(cfg.lora, lora)
    return build_model(cfg.model, lora_cfg, num_classes=10, in_chans=1, image_size=8, seed=cfg.seed)


def backbone_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "lora_" not in k}


def test_only_lora_and_head_require_grad(cfg):
    model = make(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    names = set(trainable_parameters(model))
    depth = cfg.model.kwargs.depth
    assert len([n for n in names if n.endswith("lora_A")]) == 4 * depth
    assert {param_group(n) for n in names} == {"lora_A", "lora_B", "head"}


def test_lora_placement_follows_targets_and_blocks(cfg):
    model = make(cfg, targets=["qkv", "fc2"], blocks=[0, 2])
    factors = sorted(n for n in trainable_parameters(model) if ".lora_" in n)
    assert factors == sorted(
        f"blocks.{b}.{m}.lora_{f}" for b in (0, 2) for m in ("attn.qkv", "mlp.fc2") for f in "AB"
    )
    with pytest.raises(ConfigError, match="valid choices: qkv, proj, fc1, fc2"):
        lora_target_regex(["q"], None)


def test_adapter_computes_w0_plus_scaled_ba(cfg):
    """The PEFT layer's output equals x (W0 + alpha/r B A)^T + b computed by hand."""
    model = make(cfg)
    layer = model.backbone.blocks[1].attn.qkv
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(7, w0.shape[1])
    expected = F.linear(x, w0 + (cfg.lora.alpha / cfg.lora.rank) * b @ a, bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_base_deltas_set_w0_plus_delta_without_accumulating(cfg):
    model = make(cfg)
    layers = adapted_layers(model)
    name = "blocks.1.attn.qkv"
    w0 = layers[name].base_layer.weight.detach().clone()
    delta = torch.randn_like(w0)
    for _ in range(2):
        set_base_deltas(model, {name: delta})
        torch.testing.assert_close(layers[name].base_layer.weight, w0 + delta)
    set_base_deltas(model, {})
    assert torch.equal(layers[name].base_layer.weight, w0)
    with pytest.raises(ValueError, match="shape"):
        set_base_deltas(model, {name: delta.T})
    with pytest.raises(ValueError, match="does not adapt"):
        set_base_deltas(model, {"blocks.9.attn.qkv": delta})


def test_an_adapter_folded_into_the_base_computes_the_same(cfg):
    """W0 + s B A as a base delta with B = 0 gives the live adapter's logits (LoRM's evaluated model)."""
    model = make(cfg)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.1 for k, v in get_trainable_state(model).items()}
    set_trainable_state(model, state)
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        live = model(images)
    deltas = {n: lora_scaling(cfg.lora) * state[f"{n}.lora_B"] @ state[f"{n}.lora_A"] for n in adapted_layers(model)}
    set_trainable_state(model, {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in state.items()})
    set_base_deltas(model, deltas)
    with torch.no_grad():
        torch.testing.assert_close(model(images), live, rtol=1e-4, atol=1e-5)


def test_the_built_state_survives_training_of_the_cached_model(cfg):
    """Strategies start from ``initial_state``: a cached model mutated by one run must not leak into the next."""
    model = make(cfg)
    built = get_trainable_state(model)
    set_trainable_state(model, {k: v + 1 for k, v in built.items()})
    assert all(torch.equal(built[k], v) for k, v in model.initial_state.items())


def test_backbone_is_deterministic_from_seed(cfg):
    a, b = backbone_weights(make(cfg)), backbone_weights(make(cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = compose_config("config", ["seed=1"])
    c = backbone_weights(build_model(other.model, other.lora, 10, 1, 8, seed=1))
    assert not torch.equal(a["blocks.0.attn.qkv.base_layer.weight"], c["blocks.0.attn.qkv.base_layer.weight"])


def test_trainable_state_round_trip_and_mismatch(cfg):
    model = make(cfg)
    state = {k: torch.randn_like(v) for k, v in get_trainable_state(model).items()}
    set_trainable_state(model, state)
    assert all(torch.equal(state[k], v) for k, v in get_trainable_state(model).items())
    with pytest.raises(ValueError, match="missing"):
        set_trainable_state(model, {k: v for k, v in state.items() if k != "head.bias"})
    state["head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        set_trainable_state(model, state)


def test_a_client_round_changes_only_the_requested_groups(cfg):
    """After a real local round the frozen backbone is bit-identical; A, B and head moved."""
    data = experiment_for(cfg).data
    model = model_for(cfg, data.num_classes, data.in_chans, data.image_size)
    set_base_deltas(model, {})  # the cached model may hold an earlier evaluation's merged base
    start = get_trainable_state(model)
    frozen = backbone_weights(model)
    request = TrainRequest(task=1, round_in_task=0, state=start, train_groups=("lora_B", "head"), extra={})
    tensors, num_examples, loss = run_local_round(cfg, request, partition_id=2, num_partitions=cfg.num_clients)
    assert set(tensors) == {k for k in start if param_group(k) in ("lora_B", "head")}
    assert num_examples == len(experiment_for(cfg).client_indices(1, 2)) and loss > 0
    assert all(torch.equal(frozen[k], v) for k, v in backbone_weights(model).items())
    after = get_trainable_state(model)
    assert all(torch.equal(start[k], after[k]) for k in start if param_group(k) == "lora_A")
    assert any(not torch.equal(start[k], after[k]) for k in start if param_group(k) == "lora_B")
    # only the current task's head rows (classes 2, 3) receive gradient
    moved_rows = (after["head.weight"] != start["head.weight"]).any(dim=1).nonzero().flatten().tolist()
    assert moved_rows == [2, 3]


def test_client_rejects_a_federation_of_the_wrong_size(cfg):
    request = TrainRequest(task=0, round_in_task=0, state={}, train_groups=("head",), extra={})
    with pytest.raises(ConfigError, match="num-partitions=3 != config num_clients=5"):
        run_local_round(cfg, request, partition_id=0, num_partitions=3)


def test_device_auto_and_bad_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="valid choices: auto, cpu"):
        resolve_device("tpu")


def test_local_checkpoint_loads_strictly_into_the_backbone(cfg, tmp_path):
    from safetensors.torch import save_file

    source = make(compose_config("config", ["seed=5"]))
    weights = {k: v for k, v in source.backbone.state_dict().items() if "lora_" not in k}
    plain = {k.replace(".base_layer.", "."): v.contiguous() for k, v in weights.items()}
    save_file(plain, str(tmp_path / "backbone.safetensors"))
    loaded = make(OmegaConf.merge(cfg, {"model": {"pretrained_path": str(tmp_path / "backbone.safetensors")}}))
    got = backbone_weights(loaded)
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    plain["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(plain, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="does not match model"):
        make(OmegaConf.merge(cfg, {"model": {"pretrained_path": str(tmp_path / "bad.safetensors")}}))
    with pytest.raises(ConfigError, match="does not exist"):
        make(OmegaConf.merge(cfg, {"model": {"pretrained_path": str(tmp_path / "none.safetensors")}}))
