"""The paper presets (``experiment=lorm_*`` and ``talora_*``) run: each goes through ``fcil-run``'s
path for one round on files in its data set's own on-disk format, with a randomly initialised
backbone of the preset's architecture at a small image size; and each documents the authors'
per-partition settings as commands that compose to them."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fedcil.cli.run import launch
from fedcil.config import CONF_DIR, compose_config, group_options
from fedcil.settings import check_settings

PAPER_PRESETS = [name for name in group_options("experiment") if name.startswith(("lorm_", "talora_"))]
CLASSES = 2  # classes written to disk (the first task's, where the class count is fixed)
PER_CLASS = {"train": 6, "test": 2}

# The LoRM authors' published commands: {beta: (lr, rank)}, and their Gram passes. Tiny-ImageNet
# has no published command: its preset takes the CIFAR-100 settings.
LORM_CIFAR100 = {0.5: (0.003, 1), 0.1: (0.0003, 16), 0.05: (0.0005, 16)}
LORM_AUTHORS = {
    "lorm_cifar100": (LORM_CIFAR100, 1),
    "lorm_imagenet_r": ({0.5: (0.003, 2), 0.1: (0.001, 32), 0.05: (0.001, 16)}, 2),
    "lorm_tiny_imagenet": (LORM_CIFAR100, 1),
}


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cifar-100-python/{train,test,meta}`` as the archive's pickles (uint8 rows, ``fine_labels``).

    torchvision md5-checks the files against the real archive's: its expected sums become the
    fake files' (the one stand-in; a missing or wrongly laid out file still fails)."""
    from torchvision.datasets import CIFAR100

    folder, rng = root / "cifar-100-python", np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, n in PER_CLASS.items():
        labels = np.repeat(np.arange(CLASSES), n).tolist()
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)]}))
    md5 = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


def write_jpegs(folder: Path, stem: str, n: int, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}_{i}.JPEG" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 48)), 40, 3), dtype=np.uint8)).save(folder / name)
    return names


def write_imagenet_r(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ImageNet-R archive's layout: ``imagenet-r/<wnid>/<image>.jpg``."""
    rng = np.random.default_rng(1)
    for k in range(CLASSES):
        folder = root / f"n0144{k}762"
        folder.mkdir(parents=True)
        for i in range(sum(PER_CLASS.values())):
            Image.fromarray(rng.integers(0, 256, (40, 30 + i, 3), dtype=np.uint8)).save(folder / f"art_{i}.jpg")


def write_tiny_imagenet(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The official ``tiny-imagenet-200`` archive: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``
    with ``<wnid>_boxes.txt``, and ``val/images`` labelled by ``val/val_annotations.txt``."""
    rng, wnids, annotations = np.random.default_rng(2), [f"n0{k}443537" for k in range(CLASSES)], []
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        names = write_jpegs(root / "train" / wnid / "images", wnid, PER_CLASS["train"], rng)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{n}\t0\t0\t10\t10\n" for n in names))
    for i in range(CLASSES * PER_CLASS["test"]):
        write_jpegs(root / "val" / "images", f"val_{i}", 1, rng)
        annotations.append(f"val_{i}_0.JPEG\t{wnids[i % CLASSES]}\t0\t0\t10\t10\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))


WRITERS = {"cifar100": write_cifar100, "imagenet_r": write_imagenet_r, "tiny_imagenet": write_tiny_imagenet}


def test_every_paper_preset_is_here():
    assert PAPER_PRESETS == ["lorm_cifar100", "lorm_imagenet_r", "lorm_tiny_imagenet", "talora_cifar100"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_paper_preset_runs_one_round_on_its_data_sets_format(preset, tmp_path, monkeypatch):
    """Only the scale shrinks: 2 clients, one task of 2 classes, one round of one epoch, a random
    backbone of the preset's architecture at 32 pixels; every other setting is the preset's."""
    dataset = compose_config("config", [f"experiment={preset}"]).dataset.name
    WRITERS[dataset](tmp_path / "data", monkeypatch)  # an unknown data set name fails here
    fixed_classes = dataset == "cifar100"  # the folder data sets have as many classes as folders
    out = launch("config", [
        f"experiment={preset}", f"dataset.root={tmp_path / 'data'}", "model.pretrained=false", "model.img_size=32",
        *([] if fixed_classes else ["dataset.image_size=32"]), "num_tasks=1",
        *([f"classes_per_task={CLASSES}"] if fixed_classes else []), "num_clients=2", "rounds_per_task=1",
        "local_epochs=1", "backend=inprocess", "device=cpu", "checkpoint=false",
        f"output_dir={tmp_path / 'out'}",
    ])
    results, preset_cfg = json.loads((out / "results.json").read_text()), compose_config("config", [f"experiment={preset}"])
    assert (results["method"], results["dataset"]) == (preset_cfg.method.name, dataset)
    assert results["config"]["model"]["name"] == preset_cfg.model.name
    assert results["config"]["replies"] == OmegaConf.to_container(preset_cfg.replies)
    [only_round] = results["rounds"]
    assert only_round["clients"] == 2 and not only_round["missing"] and np.isfinite(only_round["loss"])
    assert len(results["accuracy_matrix"]) == 1 and 0.0 <= results["accuracy_matrix"][0][0] <= 100.0


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}"}
    return keys


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_paper_preset_sets_only_keys_that_exist(preset):
    """A misspelt key would be added silently (and ignored): the preset's keys are those of its groups."""
    defaults = OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml").defaults
    groups = [f"{group.removeprefix('override /')}={option}" for entry in defaults for group, option in entry.items()]
    keys = leaf_keys(OmegaConf.to_container(compose_config("config", [f"experiment={preset}"])))
    assert keys - leaf_keys(OmegaConf.to_container(compose_config("config", groups))) == set()


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_a_paper_preset_uses_the_papers_merge_without_influence_bounds(preset):
    cfg = compose_config("config", [f"experiment={preset}"])
    replies = cfg.replies
    assert (replies.weighting, replies.update_factor, replies.clip_norm, replies.direction_factor) == ("claimed", None, None, None)
    if cfg.method.name == "lorm":
        assert (replies.psd_tolerance, replies.energy_factor) == (None, None)
    header = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    assert "Influence bounds: none" in header


def documented_commands(preset: str) -> list[list[str]]:
    """The ``fcil-run experiment=<preset> ...`` commands in the preset's header, as override lists."""
    header = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    return [line.split() for line in re.findall(rf"fcil-run (experiment={preset}\b.*)", header)]


@pytest.mark.parametrize("preset", sorted(LORM_AUTHORS))
def test_the_lorm_presets_document_the_authors_commands_per_partition(preset):
    settings, passes = LORM_AUTHORS[preset]
    seen = {}
    for overrides in documented_commands(preset):
        cfg = compose_config("config", overrides)
        check_settings(cfg)
        assert (cfg.partition.name, cfg.method.gram_passes, cfg.lora.alpha) == ("dirichlet", passes, cfg.lora.rank)
        seen[cfg.partition.beta] = (cfg.lr, cfg.lora.rank)
    assert seen == settings


def test_the_talora_preset_follows_the_paper_and_documents_its_partitions_and_data_sets():
    cfg = compose_config("config", ["experiment=talora_cifar100"])
    assert (cfg.method.name, cfg.model.name, list(cfg.lora.blocks)) == ("talora", "vit_base_patch16_224.dino", [0, 1])
    assert (sorted(cfg.lora.targets), cfg.optimizer, cfg.local_epochs) == (["fc1", "fc2", "proj", "qkv"], "sgd", 5)
    settings = set()
    for overrides in documented_commands("talora_cifar100"):
        cfg = compose_config("config", overrides)
        check_settings(cfg)
        assert ("beta" in cfg.partition) == (cfg.partition.name == "dirichlet")  # no stray key
        bias = cfg.partition.beta if cfg.partition.name == "dirichlet" else cfg.partition.alpha
        settings.add((cfg.dataset.name, cfg.partition.name, bias))
    partitions = {("dirichlet", beta) for beta in (0.5, 0.1, 0.05)} | {("quantity", alpha) for alpha in (2, 4, 6)}
    assert settings == {("cifar100", *p) for p in partitions} | {("tiny_imagenet", "dirichlet", 0.5)}
