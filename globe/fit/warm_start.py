"""Warm starts for (bank, codes): gauge-aligned per-expert targets, then truncated SVD, TS-PCA, spherical
k-means++ with NNLS codes, residual greedy with K-SVD sweeps, or a hybrid (SVD atoms + greedy residual atoms).

Per-expert target T_i = Q_i S_i V_i^T (top-r SVD of W_i) where the orthogonal Q_i aligns each expert's basis to
the family's shared top-r row space (Procrustes); the adapters absorb Q_i, so this only fixes the gauge and makes
experts with similar row spaces have similar targets.
"""
from __future__ import annotations

import logging
from functools import partial

import torch

from globe.device import acc_dtype
from globe.fit.config import FitConfig
from globe.fit.constants import KSVD_SWEEPS, LARGE_MATRIX, LARGE_TARGETS_BYTES
from globe.fit.distributed import LOCAL, Comm
from globe.fit.linalg import ridge_cholesky
from globe.fit.sparse_coding import code_chunk
from globe.fit.normalize import Normalizer
from globe.progress import counter, progress

log = logging.getLogger(__name__)


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


def rows_mm(x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """x [N, D] @ y [D, k] in y's dtype; x stored in a narrower dtype is upcast a row chunk at a time."""
    if x.dtype == y.dtype:
        return x @ y
    return torch.cat([x[lo:lo + chunk].to(y.dtype) @ y for lo in range(0, x.shape[0], chunk)])


def rows_tmm(x: torch.Tensor, q: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """x [N, D]^T @ q [N, k] in q's dtype, accumulated over row chunks of a narrower x."""
    if x.dtype == q.dtype:
        return x.T @ q
    out = torch.zeros(x.shape[1], q.shape[1], dtype=q.dtype, device=q.device)
    for lo in range(0, x.shape[0], chunk):
        out.addmm_(x[lo:lo + chunk].to(q.dtype).T, q[lo:lo + chunk])
    return out


def _signed(directions: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """Atoms from directions [k, D]: sign so that most experts correlate positively, then +/- pairs up to m."""
    sign = torch.sign(rows_mm(x, directions.T).sum(0)).clamp_min(0) * 2 - 1       # [k]
    directions = directions * sign[:, None]
    first = directions[:1]
    pairs = torch.stack([directions[1:], -directions[1:]], 1).reshape(-1, directions.shape[1])
    return torch.cat([first, pairs])[:m]


def _random_atoms(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    a = torch.randn(k, dim, generator=gen).to(device)
    return a / a.norm(dim=1, keepdim=True)


def _pad(atoms: torch.Tensor, m: int, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill up to m atoms with randomly chosen, slightly perturbed unit targets."""
    if atoms.shape[0] >= m:
        return atoms[:m]
    k = m - atoms.shape[0]
    pick = torch.randint(0, x.shape[0], (k,), generator=gen).to(x.device)
    rows = x[pick].float()
    extra = rows / rows.norm(dim=1, keepdim=True) + 0.1 * _random_atoms(k, x.shape[1], gen, x.device)
    return torch.cat([atoms, extra / extra.norm(dim=1, keepdim=True)])


def svd_atoms(x: torch.Tensor, m: int, gen: torch.Generator, oversample: int = 8, power: int = 3) -> torch.Tensor:
    """Randomised truncated SVD of stacked targets x [N, D]: top right singular vectors as signed atoms."""
    k = min((m + 1) // 2 + 1, *x.shape)
    probe = torch.randn(x.shape[1], min(k + oversample, x.shape[1]), generator=gen).to(x.device)
    q = torch.linalg.qr(rows_mm(x, probe)).Q                               # [N, k']
    for _ in range(power):
        q = torch.linalg.qr(rows_mm(x, rows_tmm(x, q))).Q
    _, _, vh = torch.linalg.svd(rows_tmm(x, q).T, full_matrices=False)
    return _signed(vh[:k], x, m)


def ts_pca_atoms(x: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """Tall-skinny PCA: the highest-energy rows' Gram matrix (n x n), eigenvectors mapped back to atoms."""
    keep = x.norm(dim=1).topk(min(x.shape[0], 4 * m)).indices.sort().values
    xs = x[keep].to(acc_dtype(x.device))                                   # float64 (float32 on MPS)
    evals, evecs = torch.linalg.eigh(xs @ xs.T)
    k = min((m + 1) // 2 + 1, xs.shape[0])
    top = evecs[:, -k:].flip(-1)                                           # [n, k]
    atoms = (top.T @ xs) / evals[-k:].flip(-1).clamp_min(1e-30).sqrt()[:, None]
    return _signed(atoms.float(), x, m)


def kmeans_atoms(x: torch.Tensor, m: int, gen: torch.Generator, iters: int = 15) -> torch.Tensor:
    """Spherical k-means++ centroids of the unit targets (cosine similarity)."""
    x = x.float()
    u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    k = min(m, u.shape[0])
    cent = u[torch.randint(0, u.shape[0], (1,), generator=gen)]
    for _ in range(1, k):                                                   # k-means++ seeding on 1 - cos
        dist = (1 - (u @ cent.T).amax(1)).clamp_min(0)
        cent = torch.cat([cent, u[torch.multinomial(dist.cpu() + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        assign = (u @ cent.T).argmax(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, u)
        empty = sums.norm(dim=1) == 0
        sums[empty] = cent[empty]
        cent = sums / sums.norm(dim=1, keepdim=True)
    return _pad(cent, m, x, gen)


def residual_atoms(x: torch.Tensor, atoms: torch.Tensor, m: int, gen: torch.Generator, cfg: FitConfig,
                   batches: int = 8) -> torch.Tensor:
    """Residual greedy: add normalised residuals of the worst-fit experts in batches, recoding between."""
    bar = counter("greedy atoms", total=m)
    bar.update(min(atoms.shape[0], m))
    while atoms.shape[0] < m:
        res = x - encode(x, atoms, cfg)[0] @ atoms if atoms.shape[0] else x
        k = min(max((m - atoms.shape[0] + batches - 1) // batches, 1), m - atoms.shape[0], x.shape[0])
        worst = res.norm(dim=1).topk(k).indices
        new = res[worst] / res[worst].norm(dim=1, keepdim=True).clamp_min(1e-30)
        atoms = torch.cat([atoms, new])
        bar.update(new.shape[0])
    bar.close()
    return atoms[:m]


def ksvd_sweep(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One K-SVD sweep: rank-1 refit of every used atom on its users' residual (codes kept >= 0)."""
    atoms, codes = atoms.clone(), codes.clone()
    res = x - codes @ atoms
    for j in range(atoms.shape[0]):
        users = (codes[:, j] > 0).nonzero().squeeze(1)
        if users.numel() == 0:
            continue
        e = res[users] + codes[users, j, None] * atoms[j]                   # [u, D]
        a = e @ atoms[j]                                                    # power step from the old atom
        b = a @ e
        b = b / b.norm().clamp_min(1e-30)
        a = (e @ b).clamp_min(0)
        atoms[j], codes[users, j] = b, a
        res[users] = e - a[:, None] * b
    return atoms, codes


def encode(x: torch.Tensor, atoms: torch.Tensor, cfg: FitConfig, temperature: float | None = None):
    """Sparse codes [N, m] of targets x [N, D] against unit atoms, with temperature control; returns (codes, T)."""
    gram = atoms @ atoms.T
    chol = ridge_cholesky(gram, cfg.train.ridge)
    temp = cfg.sparsity.t_init if temperature is None else temperature
    out = []
    for lo in range(0, x.shape[0], cfg.train.chunk_size):
        codes, _, temp = code_chunk(x[lo:lo + cfg.train.chunk_size].float() @ atoms.T, gram, chol, temp,
                                    cfg.sparsity, cfg.train.ridge)
        out.append(codes)
    return torch.cat(out), temp


def warm_start(targets: torch.Tensor, m: int, cfg: FitConfig, gen: torch.Generator):
    """(bank [m, r, d], codes [N, m], temperature) for the configured init from aligned targets [N, r, d]
    (fp32, or bf16 for large families: every init then streams them, see globe.fit.warm_stream)."""
    n, r, d = targets.shape
    x = targets.reshape(n, r * d)
    init = cfg.bank.init
    ts_pca, kmeans, residual, sweep = ts_pca_atoms, kmeans_atoms, residual_atoms, ksvd_sweep
    if x.dtype != torch.float32:                          # large family (bf16 targets): no fp32 copies of x
        from globe.fit import warm_stream
        ts_pca, kmeans = partial(warm_stream.ts_pca_atoms, signed=_signed), partial(warm_stream.kmeans_atoms, pad=_pad)
        residual, sweep = partial(warm_stream.residual_atoms, encode=encode), warm_stream.ksvd_sweep
    if init == "svd":
        atoms = _pad(svd_atoms(x, m, gen), m, x, gen)
    elif init == "ts_pca":
        atoms = _pad(ts_pca(x, m, gen), m, x, gen)
    elif init == "kmeans":
        atoms = kmeans(x, m, gen)
    elif init == "greedy":
        atoms = residual(x, x.new_zeros(0, r * d, dtype=torch.float32), m, gen, cfg)
    else:  # hybrid
        atoms = residual(x, svd_atoms(x, (m + 1) // 2, gen), m, gen, cfg)
    codes, temp = encode(x, atoms, cfg)
    if init in ("greedy", "hybrid"):
        for _ in progress(range(KSVD_SWEEPS), "K-SVD sweeps"):
            atoms, codes = sweep(x, atoms, codes)
    return atoms.reshape(m, r, d).contiguous(), codes, temp
