"""Random resized crop and horizontal flip on batches of image tensors, seeded.

Batched with one affine sampling grid per image, so augmenting costs a few tensor
operations per batch rather than a Python loop over images. Used for training images
(``augment``), for the images of LoRM's Gram pass (``augment.in_grams``) and, with colour
changes on top, for SimCLR's views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlip:
    """Crop a random area share in ``scale`` with an aspect ratio in ``ratio``, resize it back, flip half."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @classmethod
    def from_config(cls, aug: Any) -> CropFlip:
        """From a config node with ``crop_scale``, ``ratio`` and ``flip``."""
        return cls(pair(aug.crop_scale), pair(aug.ratio), bool(aug.flip))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random views of ``images`` (``N x C x H x W``), drawing from ``generator``."""
        n = images.shape[0]
        area = uniform(n, *self.scale, generator)
        log_ratio = uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        shift_x = (2 * torch.rand(n, generator=generator) - 1) * (1 - width)
        shift_y = (2 * torch.rand(n, generator=generator) - 1) * (1 - height)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, shift_x
        theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
        grid = F.affine_grid(theta, list(images.shape), align_corners=False).to(images.device)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def pair(values: Sequence[float]) -> tuple[float, float]:
    """Two numbers ``(low, high)`` from a config list."""
    low, high = (float(v) for v in values)
    return low, high
