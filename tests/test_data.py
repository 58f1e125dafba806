"""Data loaders on small real-format files written to tmp_path, plus split and batch helpers."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Subset

from fedcil.data import DATASETS, ArrayDataset, iterate_batches, load_dataset, read_idx, stratified_split
from fedcil.errors import ConfigError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in .gz)."""
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as fh:
        fh.write(raw)


def write_fmnist(folder: Path, gz: bool, seed: int = 0) -> dict:
    """Random uint8 Fashion-MNIST look-alike: 12 train / 6 test images; returns the arrays."""
    rng, arrays = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 12), ("test", 6)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, :2] = (0, 255)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / (STEMS[split][0] + suffix), images, 0x00000803)
        write_idx(folder / (STEMS[split][1] + suffix), labels, 0x00000801)
        arrays[split] = (images, labels)
    return arrays


def fmnist(root) -> object:
    return DATASETS.get("fashion_mnist")(OmegaConf.create({"root": str(root), "download": False}))


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_files(tmp_path, gz):
    """Plain and gzipped IDX files load with the right shape, dtype, range and labels."""
    arrays = write_fmnist(tmp_path, gz)
    data = fmnist(tmp_path)
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 1, 28)
    for split, ds, labels in (("train", data.train, data.train_labels), ("test", data.test, data.test_labels)):
        images, raw_labels = arrays[split]
        assert len(ds) == len(images) and np.array_equal(labels, raw_labels) and labels.dtype == np.int64
        x, y = ds.batch(torch.arange(len(ds)))
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert x.min() == 0.0 and x.max() == 1.0
        assert torch.allclose(x[:, 0], torch.from_numpy(images).float() / 255)
        assert torch.equal(y, torch.from_numpy(raw_labels).long())
        assert ds[3][1] == int(raw_labels[3])


def test_fashion_mnist_image_label_count_mismatch(tmp_path):
    write_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / STEMS["train"][1], np.zeros(5, dtype=np.uint8), 0x00000801)
    with pytest.raises(ConfigError, match="12 images, 5 labels"):
        fmnist(tmp_path)


def test_fashion_mnist_torchvision_raw_folder(tmp_path):
    """Files under root/FashionMNIST/raw (torchvision's layout) are found."""
    arrays = write_fmnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    assert np.array_equal(fmnist(tmp_path).test_labels, arrays["test"][1])


def test_fashion_mnist_missing_gives_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        fmnist(missing)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message


TRUNCATIONS = {
    "data": lambda raw: raw[:-1],
    "header": lambda raw: raw[:6],
    "gzip-data": lambda raw: gzip.compress(gzip.decompress(raw)[:-1]),
    "gzip-stream": lambda raw: raw[:-10],
}


@pytest.mark.parametrize("how", TRUNCATIONS)
def test_truncated_idx_gives_config_error(tmp_path, how):
    """Truncated data, header or gzip stream: a ConfigError naming the file."""
    write_fmnist(tmp_path, gz=how.startswith("gzip"))
    path = next(tmp_path.glob("t10k-labels-idx1-ubyte*"))
    assert read_idx(path).shape == (6,)
    path.write_bytes(TRUNCATIONS[how](path.read_bytes()))
    with pytest.raises(ConfigError, match="t10k-labels"):
        fmnist(tmp_path)


@pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(), reason=f"{FMNIST_DIR} missing")
def test_real_fashion_mnist():
    data = fmnist(FMNIST_DIR)
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert set(np.unique(data.train_labels)) == set(range(10)) == set(np.unique(data.test_labels))
    x, _ = data.train[0]
    assert x.shape == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0


def write_cifar100(root: Path) -> dict:
    """A tiny CIFAR-100 in torchvision's pickle layout; returns {file: md5} and the arrays."""
    folder, rng, out = root / "cifar-100-python", np.random.default_rng(0), {}
    folder.mkdir(parents=True)
    for name, n in (("train", 8), ("test", 4)):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": labels}))
        out[name] = (data, labels)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    out["md5"] = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")}
    return out


def cifar(root):
    return DATASETS.get("cifar100")(OmegaConf.create({"root": str(root), "download": False}))


def test_cifar100_missing_or_corrupt_gives_config_error(tmp_path):
    """torchvision md5-checks every file, so a fake (wrong checksum) is refused like a missing root."""
    write_cifar100(tmp_path / "fake")
    for root in (tmp_path / "absent", tmp_path / "fake"):
        with pytest.raises(ConfigError, match="CIFAR-100 not found") as err:
            cifar(root)
        assert str(root) in str(err.value) and "\n" not in str(err.value)


def test_cifar100_layout_with_fake_checksums(tmp_path, monkeypatch):
    """The only non-file stand-in: torchvision's expected md5s are set to the fake files' md5s."""
    from torchvision.datasets import CIFAR100

    fake = write_cifar100(tmp_path)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", fake["md5"]["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", fake["md5"]["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": fake["md5"]["meta"]})
    data = cifar(tmp_path)
    assert (data.num_classes, data.in_chans, data.image_size) == (100, 3, 32)
    for ds, labels, name in ((data.train, data.train_labels, "train"), (data.test, data.test_labels, "test")):
        raw, raw_labels = fake[name]
        assert labels.tolist() == raw_labels and labels.dtype == np.int64
        x, y = ds.batch(torch.arange(len(ds)))
        assert x.shape == (len(raw), 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
        assert torch.allclose(x, torch.from_numpy(raw).reshape(-1, 3, 32, 32).float() / 255)
        assert y.tolist() == raw_labels


def write_images(folder: Path, counts: dict[str, int], seed: int = 0) -> None:
    """``counts[cls]`` small PNGs of varying size and mode in ``folder/<cls>/``."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            (img.convert("L") if i % 3 == 0 else img).save(folder / cls / f"{i}.png")


def folder_cfg(root, **kw):
    return OmegaConf.create({"root": str(root), "image_size": 16, "test_fraction": 0.25, "split_seed": 0, **kw})


def test_imagenet_r_split_and_images(tmp_path):
    """Images are 3x16x16 in [0,1]; the split is stratified, disjoint, complete and seeded."""
    counts = {"bird": 4, "cat": 7, "dog": 10}
    write_images(tmp_path, counts)
    data = DATASETS.get("imagenet_r")(folder_cfg(tmp_path))
    assert (data.num_classes, data.in_chans, data.image_size) == (3, 3, 16)
    train, test = np.array(data.train.indices), np.array(data.test.indices)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(21))
    assert np.bincount(data.test_labels).tolist() == [1, 2, 2]  # round(n * 0.25) per class
    assert np.bincount(data.train_labels).tolist() == [3, 5, 8]
    x, y = data.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y == data.test_labels[0]
    again = DATASETS.get("imagenet_r")(folder_cfg(tmp_path))
    assert again.test.indices == data.test.indices
    others = [DATASETS.get("imagenet_r")(folder_cfg(tmp_path, split_seed=s)).test.indices for s in range(1, 4)]
    assert any(o != data.test.indices for o in others)


def test_imagenet_r_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        DATASETS.get("imagenet_r")(folder_cfg(tmp_path / "nope"))


def test_empty_image_folder_gives_config_error(tmp_path):
    (tmp_path / "empty-class").mkdir()
    with pytest.raises(ConfigError, match="expected .*<class>/<image files>"):
        DATASETS.get("imagenet_r")(folder_cfg(tmp_path))


def test_tiny_imagenet(tmp_path):
    """train/ and val/ class folders load as two ImageFolders with matching classes."""
    write_images(tmp_path / "train", {"n01": 3, "n02": 5})
    write_images(tmp_path / "val", {"n01": 2, "n02": 1}, seed=1)
    data = DATASETS.get("tiny_imagenet")(folder_cfg(tmp_path, image_size=12))
    assert (len(data.train), len(data.test), data.num_classes, data.image_size) == (8, 3, 2, 12)
    assert data.train_labels.tolist() == [0] * 3 + [1] * 5 and data.test_labels.tolist() == [0, 0, 1]
    images, labels = next(iterate_batches(data.test, np.arange(3), batch_size=3))
    assert images.shape == (3, 3, 12, 12) and labels.tolist() == [0, 0, 1]


def test_tiny_imagenet_errors(tmp_path):
    """A missing val/ folder and mismatched class folders are ConfigErrors."""
    write_images(tmp_path / "train", {"n01": 1, "n02": 1})
    with pytest.raises(ConfigError, match="val"):
        DATASETS.get("tiny_imagenet")(folder_cfg(tmp_path))
    write_images(tmp_path / "val", {"n01": 1, "n03": 1})
    with pytest.raises(ConfigError, match="different class folders"):
        DATASETS.get("tiny_imagenet")(folder_cfg(tmp_path))


def test_digits_split():
    """1797 images, 75/25 stratified, seeded, values in [0, 1]; load_dataset caches."""
    cfg = OmegaConf.create({"name": "digits", "test_fraction": 0.25, "split_seed": 0})
    data = DATASETS.get("digits")(cfg)
    assert len(data.train) + len(data.test) == 1797 and abs(len(data.test) - 1797 / 4) <= 5
    per_class = np.bincount(np.concatenate([data.train_labels, data.test_labels]))
    assert np.array_equal(np.bincount(data.test_labels), np.round(per_class * 0.25).astype(int))
    x, _ = data.train.batch(torch.arange(len(data.train)))
    assert x.shape[1:] == (1, 8, 8) and x.min() == 0.0 and x.max() == 1.0
    same = DATASETS.get("digits")(cfg)
    other = DATASETS.get("digits")(OmegaConf.merge(cfg, {"split_seed": 1}))
    assert np.array_equal(same.test_labels, data.test_labels) and torch.equal(same.test.images, data.test.images)
    assert not torch.equal(other.test.images, data.test.images)
    assert load_dataset(cfg) is load_dataset(OmegaConf.create(dict(cfg)))


@pytest.mark.parametrize("seed", range(5))
def test_stratified_split_properties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(20, 300)))
    frac = float(rng.uniform(0.05, 0.6))
    train, test = stratified_split(labels, frac, seed=seed)
    assert not set(train) & set(test) and np.array_equal(np.sort(np.r_[train, test]), np.arange(len(labels)))
    for cls in np.unique(labels):
        n = np.sum(labels == cls)
        assert abs(np.sum(labels[test] == cls) - n * frac) <= 0.5
    again = stratified_split(labels, frac, seed=seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


def labelled_by_index(n: int) -> ArrayDataset:
    """Item i has label i and every pixel equal to i, so batches reveal their indices."""
    return ArrayDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2), np.arange(n), 1.0)


def collect(dataset, indices, shuffle, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    batches = list(iterate_batches(dataset, indices, batch_size=4, shuffle=shuffle, generator=gen))
    assert [len(y) for _, y in batches[:-1]] == [4] * (len(batches) - 1) and 0 < len(batches[-1][1]) <= 4
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0], y.float()) and y.dtype == torch.long
    return torch.cat([y for _, y in batches]).tolist()


@pytest.mark.parametrize("generic", [False, True])
def test_iterate_batches(generic):
    """Each requested index exactly once, in order or in a seed-reproducible shuffle."""
    base = labelled_by_index(40)
    dataset = Subset(base, list(range(40))) if generic else base
    indices = np.array([3, 7, 8, 12, 19, 20, 21, 25, 30, 33, 39])
    assert collect(dataset, indices, shuffle=False) == indices.tolist()
    shuffled = collect(dataset, indices, shuffle=True, seed=5)
    assert sorted(shuffled) == indices.tolist() and shuffled != indices.tolist()
    assert collect(dataset, indices, shuffle=True, seed=5) == shuffled
    assert collect(base, indices, shuffle=True, seed=5) == shuffled  # same order on both paths


def write_tiny_imagenet_archive(root: Path, annotations: str) -> None:
    """The official layout: train/<wnid>/images/*.JPEG (with a boxes file) and val/images + annotations."""
    for wnid, n in (("n01", 3), ("n02", 2)):
        write_images(root / "train" / wnid, {"images": n})
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("0.png\t0\t0\t4\t4\n")
    write_images(root / "val", {"images": 3}, seed=1)
    (root / "val" / "val_annotations.txt").write_text(annotations)


def test_tiny_imagenet_as_the_archive_unpacks(tmp_path):
    """val/images is labelled by val_annotations.txt (file, wnid, box), with train/'s class indices."""
    write_tiny_imagenet_archive(tmp_path, "2.png\tn01\t0\t0\t4\t4\n0.png\tn02\t1\t1\t3\t3\n1.png\tn02\t0\t0\t2\t2\n\n")
    data = DATASETS.get("tiny_imagenet")(folder_cfg(tmp_path, image_size=12))
    assert (len(data.train), len(data.test), data.num_classes) == (5, 3, 2)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1] and data.test_labels.tolist() == [0, 1, 1]
    images, labels = next(iterate_batches(data.test, np.arange(3), batch_size=3))
    assert images.shape == (3, 3, 12, 12) and labels.tolist() == [0, 1, 1]
    assert [p.name for p in data.test.paths] == ["2.png", "0.png", "1.png"]


@pytest.mark.parametrize(("annotations", "message"), [
    ("0.png\tn09\t0\t0\t4\t4\n", "labels 0.png with 'n09', not a class of train/"),
    ("7.png\tn01\t0\t0\t4\t4\n", "names 7.png, which is not in"),
])
def test_tiny_imagenet_annotations_that_do_not_fit_give_one_line(tmp_path, annotations, message):
    write_tiny_imagenet_archive(tmp_path, annotations)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        DATASETS.get("tiny_imagenet")(folder_cfg(tmp_path))
    assert "\n" not in str(err.value)
