"""Closed-form, Gram-based merging of linear maps (RegMean / LoRM), as pure tensor functions.

A *Gram* here is the (regularised) second-moment matrix of a layer's inputs,
``Ĝ = a X^T X + (1 - a) diag(X^T X)``. When ``a = 0`` only the diagonal survives and a
Gram is stored as a vector of length ``d_in``; otherwise it is a dense ``d_in x d_in``
matrix. Every function takes either form, so the diagonal path never builds a dense
matrix. Solves run in float64 with a ridge ``eps = ridge * mean(diag(G))`` added to the
diagonal, which keeps them defined when some input directions carry no energy.
"""

from __future__ import annotations

import torch

Gram = torch.Tensor  # (d,) diagonal or (d, d) dense


def regularise_gram(gram: torch.Tensor, alpha: float) -> Gram:
    """``a G + (1 - a) diag(G)`` of a dense Gram; a vector (the diagonal) when ``a == 0``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"gram alpha {alpha} must lie in [0, 1]")
    if gram.dim() == 1:
        if alpha != 0.0:
            raise ValueError("a diagonal Gram can only be regularised with alpha = 0")
        return gram
    if alpha == 0.0:
        return torch.diagonal(gram).clone()
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def times_gram(matrix: torch.Tensor, gram: Gram) -> torch.Tensor:
    """``M Ĝ`` (for a diagonal Gram: each column of M scaled by its input energy)."""
    return matrix * gram if gram.dim() == 1 else matrix @ gram


def sandwich(factor: torch.Tensor, gram: Gram) -> torch.Tensor:
    """``A Ĝ A^T`` (r x r) for a factor ``A`` (r x d_in)."""
    return times_gram(factor, gram) @ factor.T


def ridge_of(gram: Gram, ridge: float) -> float:
    """The absolute ridge ``ridge * mean(diag(G))`` (0 for an all-zero Gram)."""
    diagonal = gram if gram.dim() == 1 else torch.diagonal(gram)
    return float(ridge * diagonal.mean().clamp_min(0.0))


def merge_with_grams(numerator: torch.Tensor, gram: Gram, ridge: float) -> torch.Tensor:
    """``N (G + eps I)^-1`` in float64, for a symmetric positive semi-definite ``G``.

    With ``N = sum_k W_k Ĝ_k`` and ``G = sum_k Ĝ_k`` this is the RegMean merge, the
    minimiser of ``sum_k ||X_k W^T - X_k W_k^T||^2``: LoRM's A-merge (``W = A``, B shared),
    its B-merge (``W = B`` with Grams ``A Ĝ_k A^T``), the head merge, and the cross-task
    merge ``(sum_t dW_t G_t)(sum_t G_t)^-1``. Dense Grams use a Cholesky factorisation;
    where it fails (not positive definite even with the ridge) the pseudo-inverse is used.
    A diagonal Gram's zero-energy inputs get a zero column.
    """
    numerator, gram = numerator.to(torch.float64), gram.to(torch.float64)
    eps = ridge_of(gram, ridge)
    if gram.dim() == 1:
        denominator = gram + eps
        return torch.where(denominator > 0, numerator / denominator.where(denominator > 0, 1.0), 0.0)
    regularised = gram.clone()
    regularised.diagonal().add_(eps)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) == 0:
        return torch.cholesky_solve(numerator.T, factor).T
    return numerator @ torch.linalg.pinv(regularised, hermitian=True)
