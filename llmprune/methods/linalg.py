"""The linear algebra the weight-update methods share: damping and SPD inverses, in fp32."""

from __future__ import annotations

import torch


def damped(xtx: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``XᵀX + percdamp · mean(diag) · I`` (a copy), the usual guard against ill-conditioning (per matrix
    of a batch ``[E, in, in]``)."""
    h = xtx.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag += percdamp * diag.mean(-1, keepdim=True).clamp_min(1e-8)
    return h


def spd_inverse(h: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix through its Cholesky factor.

    Solving against the identity is ~15x faster on CPU than ``torch.cholesky_inverse`` for the same
    result. Raises ``FloatingPointError`` (``what`` names the matrix) when ``h`` is not positive definite.
    """
    factor, info = torch.linalg.cholesky_ex(h)
    if bool(info.any()):
        raise FloatingPointError(f"{what} is not positive definite")
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    return torch.cholesky_solve(eye, factor)
