"""Backbone checkpoints the way timm loads them: a timm / hub checkpoint file with its 21,843-class
head through ``model.pretrained_path``, timm's offline hub cache, and one-line errors for a file
that does not fit."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.model import build_model, create_backbone

HUB_NAME = "vit_tiny_patch16_224.augreg_in21k"  # whose hub checkpoint carries head.* for 21,843 classes
IN21K = 21843


def hub_checkpoint(seed: int = 3, **arch) -> dict[str, torch.Tensor]:
    """A random checkpoint in the hub layout: the whole timm model at 224 px (16 px patches), head included,
    at the micro ViT's width and depth unless ``arch`` says otherwise."""
    torch.manual_seed(seed)
    kwargs = {**OmegaConf.to_container(compose_config("config", []).model.kwargs), **arch}
    model = timm.create_model(HUB_NAME, pretrained=False, num_classes=IN21K, **kwargs)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save(state: dict[str, torch.Tensor], path) -> str:
    """Write ``state`` as the hub does: ``model.safetensors``, or ``pytorch_model.bin`` (torch.save)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def model_cfg(*overrides: str):
    """The micro ViT at 32 px with 16 px patches (a 2 x 2 grid, against the file's 14 x 14)."""
    return compose_config("config", ["model.img_size=32", "model.patch_size=16", *overrides]).model


def resized_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The class token's position embedding as it is, the patches' resized bicubically (with antialiasing)."""
    side = int((pos_embed.shape[1] - 1) ** 0.5)
    patches = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_a_hub_checkpoint_with_its_in21k_head_loads_through_pretrained_path(filename, tmp_path):
    state = hub_checkpoint()
    assert state["head.weight"].shape[0] == IN21K
    cfg = compose_config("config", [])
    path = save(state, tmp_path / filename)
    model = build_model(model_cfg(f"model.pretrained_path={path}"), cfg.lora, num_classes=10, in_chans=3,
                        image_size=32, seed=0)
    loaded = {k.replace(".base_layer.", "."): v for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    assert set(loaded) == {k for k in state if not k.startswith("head.")}  # the classifier is dropped
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if k != "pos_embed")
    torch.testing.assert_close(loaded["pos_embed"], resized_pos_embed(state["pos_embed"], 2))


def test_a_grey_scale_backbone_takes_the_rgb_filters_summed(tmp_path):
    """timm's input adaptation: a one-channel backbone gets the sum of the file's three input channels."""
    state = hub_checkpoint()
    backbone = create_backbone(model_cfg(f"model.pretrained_path={save(state, tmp_path / 'model.safetensors')}"),
                               in_chans=1, image_size=32)
    torch.testing.assert_close(backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_timms_offline_hub_cache_serves_model_pretrained(tmp_path, monkeypatch):
    """``model.pretrained=true`` with HF_HUB_OFFLINE and a populated cache, as after one online run."""
    import huggingface_hub.constants as hub

    state = hub_checkpoint(seed=4)
    commit = "0" * 40
    repo = tmp_path / f"models--timm--{HUB_NAME}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save(state, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 and HF_HUB_CACHE set at import
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    backbone = create_backbone(model_cfg(f"model.name={HUB_NAME}", "model.pretrained=true"), in_chans=3, image_size=32)
    assert torch.equal(backbone.blocks[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"^model.pretrained=true: timm's weights for .* could not be fetched"):
        create_backbone(model_cfg(f"model.name={HUB_NAME}", "model.pretrained=true"), in_chans=3, image_size=32)


@pytest.mark.parametrize(
    ("arch", "reason"),
    [
        ({"depth": 2}, r"24 missing keys \(e.g. \['blocks.2.norm1.weight'"),  # a shallower model
        ({"depth": 6}, r"24 unexpected keys \(e.g. \['blocks.4.attn.proj.bias'"),  # a deeper one
        ({"embed_dim": 48, "num_heads": 4}, r"size mismatch for cls_token: .* \(and \d+ more\)"),  # a narrower one
    ],
)
def test_a_checkpoint_of_another_architecture_is_one_line_naming_the_file(arch, reason, tmp_path):
    path = save(hub_checkpoint(**arch), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"^checkpoint {path} does not match model 'vit_tiny_patch16_224': {reason}") as err:
        create_backbone(model_cfg(f"model.pretrained_path={path}"), in_chans=3, image_size=32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it(filename, tmp_path):
    path = tmp_path / filename
    path.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ConfigError, match=rf"^model.pretrained_path {path} could not be read as a checkpoint: ") as err:
        create_backbone(model_cfg(f"model.pretrained_path={path}"), in_chans=3, image_size=32)
    assert "\n" not in str(err.value)


def test_results_json_names_the_backbone_file_by_path_and_sha256():
    """Which of several checkpoints a run used is in its results.json: the shipped file's path and the
    SHA-256 its pretrain.json was shipped with."""
    import json

    from fedcil.results import build_results
    from fedcil.ssl import CHECKPOINT, SETTINGS, SHIPPED_DIR

    folder = next(SHIPPED_DIR.glob(f"*/{SETTINGS}")).parent
    runs = {
        "file": compose_config("config", [f"model.pretrained_path={folder / CHECKPOINT}"]),
        "hub": compose_config("config", ["model=vit_b16"]),
        "random": compose_config("config", ["seed=7"]),
    }
    recorded = {kind: build_results(cfg, [[50.0]], [1], [], 1.0, 0.0, 0.0)["backbone"] for kind, cfg in runs.items()}
    assert recorded["file"] == {"weights": "file", "path": str(folder / CHECKPOINT),
                                "sha256": json.loads((folder / SETTINGS).read_text())["sha256"]}
    assert recorded["hub"] == {"weights": "hub", "name": "vit_base_patch16_224.augreg_in21k"}
    assert recorded["random"] == {"weights": "random", "seed": 7}
