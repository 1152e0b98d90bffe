"""Gauge-aligned per-expert targets, the input of every warm start.

Per-expert target T_i = Q_i S_i V_i^T (top-r SVD of W_i) where the orthogonal Q_i aligns each expert's basis to
the family's shared top-r row space (Procrustes); the adapters absorb Q_i, so this only fixes the gauge and makes
experts with similar row spaces have similar targets. Large families store them in bf16 (target_dtype); the warm
starts then run their streamed variants.
"""
from __future__ import annotations

import torch

from globe.device import acc_dtype
from globe.fit.constants import LARGE_MATRIX, LARGE_TARGETS_BYTES
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.normalize import Normalizer
from globe.progress import progress

# LARGE_TARGETS_BYTES and LARGE_MATRIX (globe.fit.constants) are read as this module's globals: tests lower them
# here to force the large-family paths.


def target_dtype(n: int, r: int, d: int) -> torch.dtype:
    """Storage dtype of aligned targets [n, r, d]: fp32, or bf16 when fp32 would exceed LARGE_TARGETS_BYTES."""
    return torch.bfloat16 if n * r * d * 4 > LARGE_TARGETS_BYTES else torch.float32


def _randomised(p: int, d: int, r: int) -> bool:
    """Whether top-r factors of p x d matrices come from the randomised range finder (large, r <= min(p, d) / 4)."""
    return p * d >= LARGE_MATRIX and 4 * r <= min(p, d)


def top_r(w: torch.Tensor, r: int, power: int = 2, oversample: int = 16, seed: int = 0) -> torch.Tensor:
    """S_r V_r^T [c, r, d] of each w [c, p, d]: full SVD, or a randomised range finder seeded with `seed`
    (train.seed) with `power` subspace iterations for large matrices with r <= min(p, d) / 4
    (cost ~(2 power + 2) * 2 p d (r + oversample))."""
    c, p, d = w.shape
    if not _randomised(p, d, r):
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        return s[:, :r, None] * vh[:, :r]
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(w @ torch.randn(d, r + oversample, generator=gen).to(w.device)).Q   # [c, p, k]
    for _ in range(power):
        q = torch.linalg.qr(w @ (w.transpose(1, 2) @ q)).Q
    _, s, vh = torch.linalg.svd(q.transpose(1, 2) @ w, full_matrices=False)               # [c, k, d]
    return s[:, :r, None] * vh[:, :r]


def _align(src: torch.Tensor, cov: torch.Tensor, r: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """The one alignment loop: out[i] = Q_i src[i, :r] with Q_i the polar factor aligning expert i's rank-r basis
    to the top-r eigenvectors of cov [d, d] (src [N, >= r, d]; out may be src itself)."""
    ref = torch.linalg.eigh(cov).eigenvectors[:, -r:].flip(-1).T.float()    # [r, d] shared row space
    for lo in range(0, src.shape[0], chunk):
        t0 = src[lo:lo + chunk, :r].float()                                 # [c, r, d]
        u, _, v2 = torch.linalg.svd(ref @ t0.transpose(1, 2))                # polar factor of [c, r, r]
        out[lo:lo + t0.shape[0]] = (u @ v2) @ t0
    return out


def aligned_targets(weights, norm: Normalizer, r: int, chunk: int, device="cpu",
                    comm: Comm = LOCAL, dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
    """Gauge-aligned rank-r targets [N, r, d] of the normalised experts, in `dtype` (default: target_dtype).
    Distributed: of this rank's experts, aligned to the row space of all of them (the covariance is all-reduced).

    One read of the weights: per chunk the top-r factors are stored and the family covariance accumulated (from
    W, or from the factors when they are randomised, seeded with `seed`); a second in-place pass aligns them.
    """
    n, p, d = weights.shape
    dtype = dtype or target_dtype(n, r, d)
    exact_cov = not _randomised(p, d, r)
    cov = torch.zeros(d, d, dtype=acc_dtype(device), device=device)
    out = torch.empty(n, r, d, device=device, dtype=dtype)
    for lo in progress(range(0, n, chunk), "targets"):
        w = norm.chunk(weights, lo, min(lo + chunk, n), device)
        src = w if exact_cov else top_r(w, r, seed=seed)
        cov += torch.einsum("cpd,cpe->de", src, src).to(cov.dtype)
        out[lo:lo + w.shape[0]] = top_r(w, r, seed=seed) if exact_cov else src
        del w, src
    comm.all_reduce(cov)
    return _align(out, cov, r, chunk, out)


def expert_factors(weights, norm: Normalizer, rmax: int, chunk: int, device="cpu"):
    """One read and one full SVD per expert, for the shape solver and the warm start to share.

    Returns (singular values [N, min(p, d)] fp32, factors S V^T [N, rmax, d] in target_dtype, covariance
    sum_i W_i^T W_i [d, d] fp64); align_factors turns them into aligned targets of any rank r <= rmax.
    """
    n, p, d = weights.shape
    svals = torch.empty(n, min(p, d))
    factors = torch.empty(n, rmax, d, device=device, dtype=target_dtype(n, rmax, d))
    cov = torch.zeros(d, d, dtype=acc_dtype(device), device=device)
    for lo in progress(range(0, n, chunk), "spectra"):
        w = norm.chunk(weights, lo, min(lo + chunk, n), device)
        cov += torch.einsum("cpd,cpe->de", w, w).to(cov.dtype)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        svals[lo:lo + w.shape[0]] = s.cpu()
        factors[lo:lo + w.shape[0]] = s[:, :rmax, None] * vh[:, :rmax]
    return svals, factors, cov


def align_factors(factors: torch.Tensor, cov: torch.Tensor, r: int, chunk: int) -> torch.Tensor:
    """Gauge-aligned rank-r targets [N, r, d] (dtype of factors) from expert_factors' output, r <= rmax."""
    n, _, d = factors.shape
    return _align(factors, cov, r, chunk, torch.empty(n, r, d, device=factors.device, dtype=factors.dtype))
