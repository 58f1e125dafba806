"""Self-supervised pretraining of the backbone with SimCLR, its linear probe and cache.

SimCLR (Chen et al., 2020) was chosen over DINO because it is the simplest objective that
works at small scale on a CPU: one network, no momentum teacher, no centring or sharpening
schedules to tune, and its loss is well behaved at batch 256. Each image gives two random
views; their projections must pick each other out among the batch (NT-Xent loss)::

    l(i, j) = -log exp(s_ij / T) / sum_{k != i} exp(s_ik / T),   s = cosine similarity

Labels are never read while pretraining and the test split is never seen; the linear
probe afterwards fits a ridge classifier on frozen train features (with their labels) and
reports its accuracy on the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedcil.augment import CropFlip, uniform
from fedcil.data import ArrayDataset, ImageData, iterate_batches, load_dataset
from fedcil.errors import ConfigError
from fedcil.model import FCILModel, create_backbone, model_img_size, resolve_device
from fedcil.files import atomic_file, write_atomic

CHECKPOINT = "backbone.safetensors"
SETTINGS = "pretrain.json"
NOT_BACKBONE = ("pretrained_path", "ssl", "head_init", "projection_dim")  # model settings a checkpoint does not depend on
NOT_DATA = ("root", "download", "site_dir")  # where the data set lives: its content is hashed instead
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained"  # checkpoints that come with the repository


def random_views(images: torch.Tensor, aug: DictConfig, generator: torch.Generator) -> torch.Tensor:
    """A batch of random views: resized crop, horizontal flip (:class:`CropFlip`), brightness and contrast."""
    n = images.shape[0]
    views = CropFlip.from_config(aug)(images, generator)
    views = views * uniform(n, 1 - aug.brightness, 1 + aug.brightness, generator).view(n, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * uniform(n, 1 - aug.contrast, 1 + aug.contrast, generator).view(n, 1, 1, 1) + mean
    return views.clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR(nn.Module):
    """Backbone (with the model's resize and normalisation) plus a projection head."""

    def __init__(self, encoder: FCILModel, hidden_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.backbone.num_features
        self.projector = nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder.features(images))


@torch.no_grad()
def features(encoder: FCILModel, dataset, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """Frozen features of ``dataset[indices]`` (float64, on the CPU)."""
    encoder.to(device).eval()
    out = [encoder.features(x.to(device)).double().cpu() for x, _ in iterate_batches(dataset, indices, 1024)]
    return torch.cat(out)


def linear_probe_accuracy(encoder: FCILModel, data: ImageData, ridge: float, device: torch.device) -> float:
    """Test accuracy (%) of a closed-form ridge classifier on frozen, standardised features."""
    train = features(encoder, data.train, np.arange(len(data.train_labels)), device)
    test = features(encoder, data.test, np.arange(len(data.test_labels)), device)
    mean, std = train.mean(0), train.std(0) + 1e-8
    train, test = (train - mean) / std, (test - mean) / std
    train = torch.cat([train, torch.ones(len(train), 1, dtype=train.dtype)], dim=1)
    test = torch.cat([test, torch.ones(len(test), 1, dtype=test.dtype)], dim=1)
    targets = F.one_hot(torch.as_tensor(data.train_labels), data.num_classes).double()
    gram = train.T @ train
    lam = ridge * torch.trace(gram) / gram.shape[0]
    weights = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), train.T @ targets)
    predictions = (test @ weights).argmax(1).numpy()
    return float(100.0 * (predictions == data.test_labels).mean())


def data_fingerprint(data: ImageData) -> str:
    """A hash of the training images (in-memory data sets; others: of their count only)."""
    digest = hashlib.sha256()
    if isinstance(data.train, ArrayDataset):
        digest.update(data.train.images.numpy().tobytes())
    digest.update(np.asarray(data.train_labels).shape.__repr__().encode())
    return digest.hexdigest()[:16]


def checkpoint_settings(cfg: DictConfig, data: ImageData) -> dict:
    """Everything the checkpoint depends on: pretraining, model and data."""
    pretrain = OmegaConf.to_container(cfg.pretrain, resolve=True)
    pretrain.pop("cache_dir")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in NOT_BACKBONE:
        model.pop(key)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in NOT_DATA:
        dataset.pop(key, None)
    return {"pretrain": pretrain, "model": model, "dataset": dataset, "data": data_fingerprint(data)}


def checkpoint_dir(cfg: DictConfig, data: ImageData) -> Path:
    """The cache folder of the checkpoint for these settings (keyed by their hash)."""
    key = hashlib.sha256(json.dumps(checkpoint_settings(cfg, data), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.pretrain.cache_dir).expanduser().resolve() / f"{cfg.pretrain.name}-{key}"


@dataclass
class PretrainResult:
    """Where the checkpoint is and how pretraining went."""

    path: Path
    settings: dict
    reused: bool


def pretrain(cfg: DictConfig, data: ImageData, out: Path, log: Callable[[str], None] = print) -> dict:
    """Train the backbone with SimCLR on ``data``'s training images; write checkpoint + JSON."""
    from safetensors.torch import save_file

    p = cfg.pretrain
    device = resolve_device(cfg.device)
    torch.manual_seed(p.seed)
    untrained = OmegaConf.merge(cfg.model, {"ssl": False, "pretrained_path": None})
    backbone = create_backbone(untrained, data.in_chans, data.image_size)
    encoder = FCILModel(backbone, data.num_classes, model_img_size(cfg.model, data.image_size))
    model = SimCLR(encoder, p.hidden_dim, p.projection_dim).to(device)
    images = np.arange(len(data.train_labels))
    if p.max_images is not None:
        images = np.sort(np.random.default_rng(p.seed).permutation(images)[: p.max_images])
    steps_per_epoch = max(1, len(images) // p.batch_size)
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(warmup, 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
    )
    generator = torch.Generator().manual_seed(p.seed)
    random_probe = linear_probe_accuracy(encoder, data, p.probe.ridge, device)
    log(f"pretrain: SimCLR on {len(images)} {cfg.dataset.name} training images (no labels), {p.epochs} epochs; "
        f"linear probe of the random initialisation: {random_probe:.2f}%")
    started, losses, step = time.monotonic(), [], 0
    for epoch in range(p.epochs):
        model.train()
        epoch_loss, batches = 0.0, 0
        for batch, _labels in iterate_batches(data.train, images, p.batch_size, shuffle=True, generator=generator):
            if len(batch) < p.batch_size:
                continue  # drop the last partial batch: NT-Xent wants full batches
            views = [random_views(batch, p.augment, generator).to(device) for _ in range(2)]
            loss = nt_xent(model(views[0]), model(views[1]), p.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss, batches, step = epoch_loss + loss.item(), batches + 1, step + 1
        losses.append(epoch_loss / max(batches, 1))
        elapsed = time.monotonic() - started
        log(f"pretrain: epoch {epoch + 1}/{p.epochs} loss {losses[-1]:.4f}  {elapsed:.0f}s  "
            f"ETA {elapsed / (epoch + 1) * (p.epochs - epoch - 1):.0f}s")
    wall = time.monotonic() - started
    probe = linear_probe_accuracy(encoder, data, p.probe.ridge, device)
    log(f"pretrain: linear probe {probe:.2f}% (random init {random_probe:.2f}%), {wall:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    with atomic_file(out / CHECKPOINT) as tmp:
        save_file(state, str(tmp))
    settings = {
        **checkpoint_settings(cfg, data),
        "sha256": file_sha256(out / CHECKPOINT),
        "epoch_losses": losses,
        "wall_seconds": wall,
        "linear_probe_accuracy": probe,
        "random_init_probe_accuracy": random_probe,
        "images": int(len(images)),
    }
    write_atomic(out / SETTINGS, json.dumps(settings, indent=2))
    return settings


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex (read in chunks: a ViT-B checkpoint is 340 MB)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def shipped_checkpoint(folder: Path) -> PretrainResult:
    """A checkpoint that comes with the repository, once its bytes match the hash it was shipped with."""
    settings = json.loads((folder / SETTINGS).read_text())
    if file_sha256(folder / CHECKPOINT) != settings.get("sha256"):
        raise ConfigError(f"{folder / CHECKPOINT} does not match the sha256 in its {SETTINGS}: restore it from git")
    return PretrainResult(folder / CHECKPOINT, settings, reused=True)


def ensure_pretrained(cfg: DictConfig, log: Callable[[str], None] = print, retrain: bool = False) -> PretrainResult:
    """The checkpoint for ``cfg``: cached, else shipped in ``pretrained/``, else pretrained now into the cache.

    ``retrain``: pretrain now into the cache whatever the cache or ``pretrained/`` hold (how a
    shipped checkpoint is reproduced), and log the shipped one's probe and whether the bytes agree.
    """
    data = load_dataset(cfg.dataset)
    folder = checkpoint_dir(cfg, data)
    shipped = SHIPPED_DIR / folder.name
    if retrain:
        result = PretrainResult(folder / CHECKPOINT, pretrain(cfg, data, folder, log), reused=False)
        if (shipped / SETTINGS).is_file():
            known = json.loads((shipped / SETTINGS).read_text())
            same = "the same bytes" if known.get("sha256") == result.settings["sha256"] else "other bytes"
            log(f"pretrain: the shipped {shipped / CHECKPOINT} has linear probe {known['linear_probe_accuracy']:.2f}%; "
                f"this one {result.settings['linear_probe_accuracy']:.2f}%, {same}")
        return result
    if (folder / CHECKPOINT).is_file() and (folder / SETTINGS).is_file():
        result = PretrainResult(folder / CHECKPOINT, json.loads((folder / SETTINGS).read_text()), reused=True)
    elif (shipped / CHECKPOINT).is_file():
        result = shipped_checkpoint(shipped)
    else:
        return PretrainResult(folder / CHECKPOINT, pretrain(cfg, data, folder, log), reused=False)
    log(f"pretrain: reusing {result.path} (linear probe {result.settings['linear_probe_accuracy']:.2f}%)")
    return result
