"""Exact aggregation of LoRA factors with a residual folded into the frozen base (ResWU / FedEx).

Averaging factors separately is inexact: ``B̄ Ā != sum_k p_k B_k A_k``. The residual
``W_res = s (sum_k p_k B_k A_k - B̄ Ā)`` (``s`` the LoRA scaling), added to ``W0``, makes it
exact::

    (W0 + W_res) + s B̄ Ā == W0 + s sum_k p_k B_k A_k

``W_res = [p_1 B_1, ..., p_K B_K, -B̄] [A_1; ...; A_K; Ā]`` (times ``s``) has rank at most
``(K + 1) r``, so it can travel as two thin factors ``U V`` instead of a dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcil.protocol import TensorDict


def residual_factors(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], shares: Sequence[float], scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U V = s (sum_k p_k B_k A_k - B̄ Ā)``, in float64."""
    Bs = [B.to(torch.float64) for B in Bs]
    As = [A.to(torch.float64) for A in As]
    B_mean = sum(p * B for p, B in zip(shares, Bs, strict=True))
    A_mean = sum(p * A for p, A in zip(shares, As, strict=True))
    U = scaling * torch.cat([p * B for p, B in zip(shares, Bs)] + [-B_mean], dim=1)
    V = torch.cat([*As, A_mean], dim=0)
    return U, V


class ResidualBase:
    """The cumulative change of ``W0`` per adapted layer, kept factored while that is smaller.

    A layer's residual is stored as ``U V`` as long as ``k (d_out + d_in) < d_out d_in`` for
    its accumulated rank ``k``, and as a dense float64 matrix from then on.
    """

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense: dict[str, torch.Tensor] = {}

    def add(self, layer: str, U: torch.Tensor, V: torch.Tensor) -> None:
        """Add ``U V`` to ``layer``'s residual."""
        if layer in self.dense:
            self.dense[layer] = self.dense[layer] + U @ V  # a new tensor: deltas() handed out stay valid
            return
        if layer in self.factors:
            U0, V0 = self.factors.pop(layer)
            U, V = torch.cat([U0, U], dim=1), torch.cat([V0, V], dim=0)
        d_out, d_in = U.shape[0], V.shape[1]
        if U.shape[1] * (d_out + d_in) < d_out * d_in:
            self.factors[layer] = (U, V)
        else:
            self.dense[layer] = U @ V

    def deltas(self) -> TensorDict:
        """Per layer, the dense residual."""
        return {**{layer: U @ V for layer, (U, V) in self.factors.items()}, **self.dense}

    def message(self) -> TensorDict:
        """The residual as a request's ``base`` (see fedcil.protocol), in its smaller form."""
        packed = {f"{layer}.delta": delta for layer, delta in self.dense.items()}
        for layer, (U, V) in self.factors.items():
            packed[f"{layer}.U"], packed[f"{layer}.V"] = U, V
        return packed

    def to_tensors(self, prefix: str) -> TensorDict:
        """The residual as named tensors (``<prefix><layer>.U``/``.V`` or ``.delta``), for checkpoints."""
        return {f"{prefix}{name}": tensor for name, tensor in self.message().items()}

    @classmethod
    def from_tensors(cls, tensors: TensorDict, prefix: str) -> ResidualBase:
        """The residual that :meth:`to_tensors` wrote under ``prefix``."""
        base = cls()
        for key, tensor in tensors.items():
            name = key.removeprefix(prefix)
            if not key.startswith(prefix):
                continue
            if name.endswith(".delta"):
                base.dense[name.removesuffix(".delta")] = tensor
            elif name.endswith(".U"):
                layer = name.removesuffix(".U")
                base.factors[layer] = (tensor, tensors[f"{prefix}{layer}.V"])
        return base
