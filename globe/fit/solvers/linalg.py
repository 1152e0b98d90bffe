"""Batched ridge-regularised SPD solves (Cholesky) with a fallback for ill-conditioned systems."""
from __future__ import annotations

import logging
import math

import torch

from globe.errors import NumericalError

log = logging.getLogger(__name__)


def ridge_cholesky(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of gram + ridge * mean(diag) * I, batched over leading dims.

    gram: [..., k, k] symmetric PSD (fp32/fp64). Where a factorisation fails the ridge is raised
    tenfold (up to 6 times) for the failing systems only, and that is logged.
    """
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]  # [..., 1, 1]
    lam = max(ridge, 1e-12)
    system = gram + lam * scale * eye
    chol, info = torch.linalg.cholesky_ex(system)
    tries = 0
    while bool((info > 0).any()) and tries < 6:
        bad = info > 0
        lam *= 10.0
        tries += 1
        log.warning("ill-conditioned system in %d of %d solves (condition number %.2e): raising ridge to %.1e",
                    int(bad.sum()), bad.numel(), condition_number(gram[bad]), lam)
        fixed, info_fixed = torch.linalg.cholesky_ex(gram[bad] + lam * scale[bad] * eye)
        chol[bad] = fixed
        info = info.clone()
        info[bad] = info_fixed
    if bool((info > 0).any()):
        finite = bool(torch.isfinite(gram).all())
        raise NumericalError("normal equations are not positive definite even with ridge %.0e%s"
                             % (lam, "" if finite else " (they contain NaN/Inf: check the weights)"))
    return chol


def condition_number(gram: torch.Tensor) -> float:
    """Largest 2-norm condition number among the symmetric PSD systems in gram [..., k, k] (inf if singular)."""
    if not bool(torch.isfinite(gram).all()):
        return math.inf
    eig = torch.linalg.eigvalsh(gram.double()).abs()
    return float((eig.amax(-1) / eig.amin(-1).clamp_min(1e-300)).max())


def solve_right(rhs: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """X = rhs @ S^-1 for S = chol @ chol^T symmetric. rhs: [..., n, k], chol: [..., k, k]."""
    return torch.cholesky_solve(rhs.transpose(-1, -2), chol).transpose(-1, -2)


def solve_left(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X = S^-1 @ rhs for S = chol @ chol^T. chol: [..., k, k], rhs: [..., k, n]."""
    return torch.cholesky_solve(rhs, chol)


def matmul(a: torch.Tensor, b: torch.Tensor, low: torch.dtype | None = None) -> torch.Tensor:
    """a @ b, with both operands rounded to `low` (e.g. bf16; the kernels accumulate in fp32) and the product
    returned in a's dtype when `low` is given. Used only where rounding errors average out (see TrainConfig)."""
    if low is None or a.dtype == low:
        return a @ b
    return (a.to(low) @ b.to(low)).to(a.dtype)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 here: CUDA/MPS, or a CPU with native bf16 instructions (AVX512-BF16/AMX)."""
    if device.type != "cpu":
        return True
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


LARGE_EXPERT = 2**20   # p * d from which precision="auto" uses bf16 (bf16 checkpoints only)


def low_precision(precision: str, weights_dtype: torch.dtype, p: int, d: int,
                  device: torch.device) -> torch.dtype | None:
    """The dtype of the rounding-tolerant products for TrainConfig.precision, or None for fp32 everywhere."""
    if precision == "bf16" or (precision == "auto" and weights_dtype == torch.bfloat16 and p * d >= LARGE_EXPERT
                               and bf16_is_fast(device)):
        return torch.bfloat16
    return None


def cond_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """Cheap lower bound on the condition number of chol @ chol^T: (max diag / min diag)^2."""
    diag = chol.diagonal(dim1=-2, dim2=-1).abs()
    return (diag.amax(-1) / diag.amin(-1).clamp_min(1e-30)) ** 2
