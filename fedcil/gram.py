"""Gram matrices of layer inputs, gathered with forward hooks over a client's data.

For a ViT every token of every image is a row of ``X`` (inputs of shape ``(B, N, d)``
are flattened to ``(B * N, d)``); for the head every image is one row. Sums are taken in
float64. A layer whose Gram is regularised with ``a = 0`` only ever accumulates the
diagonal ``sum x_j^2`` (a vector), never the dense ``d x d`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedcil.data import iterate_batches
from fedcil.model import FCILModel
from fedcil.closed_form import Gram, regularise_gram


class GramRecorder:
    """Forward hooks that add up ``X^T X`` (or its diagonal) of the inputs of named modules."""

    def __init__(self, modules: dict[str, nn.Module], alphas: dict[str, float]) -> None:
        self.alphas = alphas
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        diagonal = self.alphas[name] == 0.0

        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            term = (rows * rows).sum(dim=0) if diagonal else rows.T @ rows
            self.sums[name] = term if name not in self.sums else self.sums[name] + term

        return record

    def grams(self) -> dict[str, Gram]:
        """The regularised Grams ``Ĝ = a G + (1 - a) diag(G)`` on the CPU."""
        return {name: regularise_gram(total.cpu(), self.alphas[name]) for name, total in self.sums.items()}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def compute_grams(
    model: FCILModel,
    modules: dict[str, nn.Module],
    alphas: dict[str, float],
    dataset: Dataset,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    views: Callable[[torch.Tensor], torch.Tensor] | None = None,
    passes: int = 1,
) -> dict[str, Gram]:
    """Regularised input Grams of ``modules`` over the images ``indices`` of ``dataset`` (through
    ``views`` first, e.g. the training augmentation, if given), averaged over ``passes`` passes
    (each pass draws fresh views, so the Grams keep the scale of one pass; without views one pass
    gives the same)."""
    passes = passes if views is not None else 1
    model.to(device).eval()
    recorder = GramRecorder(modules, alphas)
    try:
        for _ in range(passes):
            for images, _ in iterate_batches(dataset, indices, batch_size):
                model((images if views is None else views(images)).to(device))
    finally:
        recorder.close()
    return {name: gram / passes for name, gram in recorder.grams().items()}
