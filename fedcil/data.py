"""Image classification datasets, chosen by name (``dataset.name``), all offline-capable.

Every loader returns an :class:`ImageData`: train and test sets whose items are
``(image float CxHxW in [0, 1], label)``, plus their label arrays so that splitting and
partitioning never touch the images. Small data sets live in memory as an
:class:`ArrayDataset` (fast batch indexing); ImageFolder data sets load lazily.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from fedcil.errors import ConfigError
from fedcil.registry import Registry
from fedcil.shapes import FIXED_SHAPES, DataShape, declared_shape

DATASETS: Registry = Registry("dataset")


class ArrayDataset(Dataset):
    """Images held as one integer tensor (N, C, H, W), scaled to [0, 1] on access."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, scale: float) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Stored integer images as floats in [0, 1]."""
        return images.float() * self.scale

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels(self.images[index]), int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by fancy indexing (no per-item Python loop)."""
        return self.pixels(self.images[indices]), self.labels[indices]


class DecodedImageArrays(ArrayDataset):
    """Images of an image-file data set held as ``uint8`` arrays: floats exactly as torchvision's
    ``ToTensor`` makes them from the decoded files (a division by 255, not a product with 1/255)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        super().__init__(images, labels, 1 / 255)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div(255)


@dataclass(frozen=True)
class ImageData:
    """A data set's train and test splits with their labels and image geometry."""

    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    in_chans: int
    image_size: int


def iterate_batches(
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches over ``dataset[indices]``."""
    order = torch.as_tensor(indices, dtype=torch.long)
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    if isinstance(dataset, ArrayDataset):
        for start in range(0, len(order), batch_size):
            yield dataset.batch(order[start : start + batch_size])
        return
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False)
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of ``range(len(labels))`` into (train, test) index arrays."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@DATASETS.register("digits")
def load_digits(cfg: DictConfig) -> ImageData:
    """scikit-learn's 8x8 digits, 16 grey levels, stratified train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    return ImageData(
        train=ArrayDataset(images[train_idx], labels[train_idx], 1 / 16),
        test=ArrayDataset(images[test_idx], labels[test_idx], 1 / 16),
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
        **vars(FIXED_SHAPES["digits"]),
    )


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"{path} is truncated or not gzip: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ConfigError(f"{path} is truncated: header of {ndim} dimensions cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def find_idx_file(root: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``root`` or torchvision's ``root/FashionMNIST/raw``."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(cfg: DictConfig) -> ImageData:
    """Fashion-MNIST from IDX files under ``cfg.root`` (torchvision download if allowed)."""
    root = Path(cfg.root)
    if cfg.download and find_idx_file(root, IDX_FILES["train_images"]) is None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    paths = {key: find_idx_file(root, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST files {missing} (or .gz) not found in {root}; "
            "run `apt-get install dataset-fashion-mnist`, or set dataset.root, or dataset.download=true"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise ConfigError(
                f"Fashion-MNIST {split} files in {root} disagree: {len(arrays[f'{split}_images'])} images, "
                f"{len(arrays[f'{split}_labels'])} labels"
            )
    train_labels = arrays["train_labels"].astype(np.int64)
    test_labels = arrays["test_labels"].astype(np.int64)
    return ImageData(
        train=ArrayDataset(torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1), train_labels, 1 / 255),
        test=ArrayDataset(torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1), test_labels, 1 / 255),
        train_labels=train_labels,
        test_labels=test_labels,
        **vars(FIXED_SHAPES["fashion_mnist"]),
    )


@DATASETS.register("cifar100")
def load_cifar100(cfg: DictConfig) -> ImageData:
    """CIFAR-100 through torchvision, from ``cfg.root`` (downloaded there if allowed)."""
    from torchvision.datasets import CIFAR100

    try:
        splits = [CIFAR100(str(cfg.root), train=train, download=cfg.download) for train in (True, False)]
    except RuntimeError as exc:
        raise ConfigError(
            f"CIFAR-100 not found under {cfg.root} ({exc}); set dataset.root or dataset.download=true"
        ) from None
    images = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits]
    labels = [np.asarray(s.targets, dtype=np.int64) for s in splits]
    return ImageData(
        train=ArrayDataset(images[0], labels[0], 1 / 255),
        test=ArrayDataset(images[1], labels[1], 1 / 255),
        train_labels=labels[0],
        test_labels=labels[1],
        **vars(FIXED_SHAPES["cifar100"]),
    )


def square_images(image_size: int):
    """The transform of the image-file data sets: resize, centre-crop to a square, to a tensor."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])


def image_folder(root: Path, image_size: int):
    """A torchvision ImageFolder whose images are resized and centre-cropped to a square."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    try:
        return ImageFolder(str(root), transform=square_images(image_size))
    except FileNotFoundError as exc:
        raise ConfigError(f"image folder {root}: {exc} (expected {root}/<class>/<image files>)") from None


@DATASETS.register("imagenet_r")
def load_imagenet_r(cfg: DictConfig) -> ImageData:
    """ImageNet-R from ``root/<class>/*``; a seeded stratified train/test split."""
    folder = image_folder(Path(cfg.root), cfg.image_size)
    labels = np.asarray(folder.targets, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    return ImageData(
        train=Subset(folder, train_idx.tolist()),
        test=Subset(folder, test_idx.tolist()),
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
        num_classes=len(folder.classes),
        in_chans=3,
        image_size=cfg.image_size,
    )


class LabelledImages(Dataset):
    """Image files with given labels, read and transformed on access."""

    def __init__(self, paths: list[Path], labels: list[int], transform) -> None:
        self.paths, self.targets, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(str(self.paths[index]))), self.targets[index]


def annotated_images(folder: Path, classes: list[str], image_size: int) -> LabelledImages:
    """The archive's ``val/``: ``images/<file>`` labelled by ``val_annotations.txt`` (file, wnid, box)."""
    index = {wnid: k for k, wnid in enumerate(classes)}
    paths, labels = [], []
    for line in (folder / "val_annotations.txt").read_text().splitlines():
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in index:
            raise ConfigError(f"{folder}/val_annotations.txt labels {name} with {wnid!r}, not a class of train/")
        if not (folder / "images" / name).is_file():
            raise ConfigError(f"{folder}/val_annotations.txt names {name}, which is not in {folder}/images")
        paths.append(folder / "images" / name)
        labels.append(index[wnid])
    return LabelledImages(paths, labels, square_images(image_size))


@DATASETS.register("tiny_imagenet")
def load_tiny_imagenet(cfg: DictConfig) -> ImageData:
    """Tiny-ImageNet from ``root/train/<wnid>/...`` and, as in the archive, ``root/val/images`` with
    ``root/val/val_annotations.txt`` (or ``root/val/<wnid>/...``, the validation images sorted)."""
    train = image_folder(Path(cfg.root) / "train", cfg.image_size)
    val = Path(cfg.root) / "val"
    if (val / "val_annotations.txt").is_file():
        test = annotated_images(val, train.classes, cfg.image_size)
    else:
        test = image_folder(val, cfg.image_size)
        if train.classes != test.classes:
            raise ConfigError(f"{cfg.root}/train and {cfg.root}/val have different class folders")
    return ImageData(
        train=train,
        test=test,
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        num_classes=len(train.classes),
        in_chans=3,
        image_size=cfg.image_size,
    )


SITE_SPLITS = ("train", "test")
SITE_FILE = "site.json"
PIXEL_MAX = {"digits": 16}  # the largest pixel value of a data set's images where it is not 255


def pixel_max(name: str) -> int:
    """The largest stored pixel value of data set ``name`` (its images are ``uint8`` in ``0..pixel_max``)."""
    return PIXEL_MAX.get(name, 255)


def site_arrays(data: ImageData, split: str, indices: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` of ``data``'s ``split`` as a site stores them (``uint8`` N x C x H x W) and their own labels."""
    scale = pixel_max(name)
    images = [np.zeros((0, data.in_chans, data.image_size, data.image_size), np.uint8)]
    labels = [np.zeros(0, np.int64)]
    for batch, classes in iterate_batches(getattr(data, split), indices, 512):
        images.append(torch.round(batch * scale).to(torch.uint8).numpy())
        labels.append(classes.numpy().astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def write_site(folder: Path, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a site folder: ``site.json`` and one ``<split>.npz`` (``images``, ``labels``) per split."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        np.savez_compressed(folder / f"{split}.npz", images=images, labels=labels)
    (folder / SITE_FILE).write_text(json.dumps({"dataset": name}) + "\n")


def read_site_split(folder: Path, split: str, name: str, shape: DataShape) -> tuple[torch.Tensor, np.ndarray]:
    """One split of a site folder, checked against data set ``name``: its images (N x C x H x W) and labels."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise ConfigError(f"site file {path} is missing (a site holds {', '.join(s + '.npz' for s in SITE_SPLITS)} and {SITE_FILE})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path} is not a readable .npz file: {exc}") from None
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise ConfigError(f"{path} has no array {missing[0]!r}; a site file holds 'images' and 'labels'")
    images, labels = arrays["images"], arrays["labels"]
    expected = (shape.in_chans, shape.image_size, shape.image_size)
    if images.ndim == 3 and shape.in_chans == 1:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ConfigError(f"{path}: images of shape {images.shape}, but dataset={name} needs N x {' x '.join(map(str, expected))}")
    top = pixel_max(name)
    if images.dtype != np.uint8 or (images.size and int(images.max()) > top):
        raise ConfigError(f"{path}: images must be uint8 in 0..{top} for dataset={name}, found {images.dtype} up to {images.max(initial=0)}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{path}: labels must be {len(images)} integers (one per image), found {labels.dtype} of shape {labels.shape}")
    outside = labels[(labels < 0) | (labels >= shape.num_classes)]
    if outside.size:
        raise ConfigError(f"{path}: label {outside[0]} outside dataset={name}'s classes 0..{shape.num_classes - 1}")
    return torch.from_numpy(np.ascontiguousarray(images)), labels.astype(np.int64)


def site_dataset(name: str, images: torch.Tensor, labels: np.ndarray) -> ArrayDataset:
    """A site's images as data set ``name``'s loader gives them: the array data sets scale their stored
    integers, the image-file ones (not in ``FIXED_SHAPES``) give what ``ToTensor`` gives."""
    if name in FIXED_SHAPES:
        return ArrayDataset(images, labels, 1 / pixel_max(name))
    return DecodedImageArrays(images, labels)


def load_site(cfg: DictConfig) -> ImageData:
    """A site's own samples from ``cfg.site_dir`` (``site.json``, ``train.npz``, ``test.npz``); nothing else is read."""
    folder = Path(cfg.site_dir)
    try:
        declared = json.loads((folder / SITE_FILE).read_text()).get("dataset")
    except FileNotFoundError:
        raise ConfigError(f"site file {folder / SITE_FILE} is missing (it names the data set: {{\"dataset\": \"{cfg.name}\"}})") from None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{folder / SITE_FILE} is not a JSON object naming the data set: {exc}") from None
    if declared != cfg.name:
        raise ConfigError(f"{folder / SITE_FILE} holds dataset={declared!r}, but the run uses dataset={cfg.name}")
    shape = declared_shape(cfg)
    (train_images, train_labels), (test_images, test_labels) = (
        read_site_split(folder, split, cfg.name, shape) for split in SITE_SPLITS
    )
    return ImageData(
        train=site_dataset(cfg.name, train_images, train_labels),
        test=site_dataset(cfg.name, test_images, test_labels),
        train_labels=train_labels,
        test_labels=test_labels,
        **vars(shape),
    )


@lru_cache(maxsize=2)
def _load_cached(key: str) -> ImageData:
    cfg = OmegaConf.create(json.loads(key))
    if OmegaConf.select(cfg, "site_dir") is not None:
        return load_site(cfg)
    return DATASETS.get(cfg.name)(cfg)


def load_dataset(cfg: DictConfig) -> ImageData:
    """Load the data set described by ``cfg`` (the ``dataset`` group), cached per process.

    With ``site_dir`` set, only that site folder is read (:func:`load_site`). A ``num_classes``
    set in the config must match the data found.
    """
    data = _load_cached(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True))
    declared = OmegaConf.select(cfg, "num_classes")
    if declared is not None and int(declared) != data.num_classes:
        raise ConfigError(f"dataset.num_classes={declared} but {cfg.root} holds {data.num_classes} classes")
    return data
