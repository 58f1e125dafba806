"""The SimCLR backbones shipped in pretrained/: found by the same settings hash as the cache,
intact, and loadable; a tampered file is refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fedcil.config import compose_config
from fedcil.data import load_dataset
from fedcil.errors import ConfigError
from fedcil.model import create_backbone
from fedcil.ssl import CHECKPOINT, SETTINGS, SHIPPED_DIR, checkpoint_dir, checkpoint_settings, ensure_pretrained, file_sha256, shipped_checkpoint

# the settings each shipped backbone serves (and that `fcil-pretrain` reproduces it from)
SERVED = {"digits": ["experiment=digits_ssl"], "fashion_mnist": ["experiment=fmnist_ssl"]}
FASHION = os.path.isdir("/usr/share/datasets/fashion-mnist")


def test_one_backbone_is_shipped_per_small_data_set():
    shipped = [json.loads(f.read_text())["dataset"]["name"] for f in sorted(SHIPPED_DIR.glob(f"*/{SETTINGS}"))]
    assert sorted(shipped) == sorted(SERVED)
    assert all(f.stat().st_size < 5 * 2**20 for f in SHIPPED_DIR.glob(f"*/{CHECKPOINT}"))


@pytest.mark.parametrize("dataset", sorted(SERVED))
def test_the_shipped_backbone_is_found_by_its_settings_hash_and_loads(dataset, tmp_path):
    if dataset == "fashion_mnist" and not FASHION:
        pytest.skip("apt-get install dataset-fashion-mnist")
    cfg = compose_config("config", [*SERVED[dataset], f"pretrain.cache_dir={tmp_path}"])  # an empty cache
    data = load_dataset(cfg.dataset)
    folder = SHIPPED_DIR / checkpoint_dir(cfg, data).name
    recorded = json.loads((folder / SETTINGS).read_text())
    expected = checkpoint_settings(cfg, data)
    assert {key: recorded[key] for key in expected} == expected
    assert file_sha256(folder / CHECKPOINT) == recorded["sha256"]
    assert recorded["linear_probe_accuracy"] > recorded["random_init_probe_accuracy"] + 5
    result = ensure_pretrained(cfg, log=lambda _: None)
    assert result.reused and result.path == folder / CHECKPOINT and not any(tmp_path.iterdir())
    model_cfg = compose_config("config", [*SERVED[dataset], f"model.pretrained_path={result.path}"]).model
    create_backbone(model_cfg, data.in_chans, data.image_size)  # strict: every key and shape


def test_a_shipped_backbone_whose_bytes_changed_is_refused(tmp_path):
    source = next(SHIPPED_DIR.glob(f"*/{SETTINGS}")).parent
    copy = shutil.copytree(source, tmp_path / source.name)
    data = bytearray((copy / CHECKPOINT).read_bytes())
    data[-1] ^= 0xFF
    (copy / CHECKPOINT).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match the sha256"):
        shipped_checkpoint(copy)
