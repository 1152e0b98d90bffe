"""Streamed variants of the warm starts for large families, whose aligned targets x [N, r d] are stored in bf16
(globe.fit.warm_start.target_dtype): the same algorithms, but no fp32 copy of x or of its residual is ever held.

    residual_atoms  residual norms chunk by chunk, the worst experts' residuals recomputed alone
    ksvd_sweep      the residual kept in the targets' dtype (bf16), each atom's users processed in chunks
    kmeans_atoms    unit rows formed chunk by chunk; the k-means++ seeding keeps a running max similarity
    ts_pca_atoms    the Gram of the highest-energy rows and the atoms accumulated over column blocks

Peak beyond x itself: one residual in x's dtype (K-SVD only), two fp32 atom sets and chunk-sized work.
globe.fit.warm_start dispatches here and passes its helpers (encode, _pad, _signed) in, so this module imports
nothing of it.
"""
from __future__ import annotations

import torch

from globe.device import acc_dtype
from globe.fit.config import FitConfig
from globe.progress import counter

ROWS = 64             # experts (rows of x) upcast to fp32 at once
COLUMNS = 2**16       # columns of x upcast at once by ts_pca_atoms


def _residual(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor | None, rows) -> torch.Tensor:
    """fp32 residual x[rows] - codes[rows] @ atoms (x[rows] itself without atoms)."""
    part = x[rows].float()
    return part if codes is None else part - codes[rows] @ atoms


def residual_atoms(x: torch.Tensor, atoms: torch.Tensor, m: int, gen: torch.Generator, cfg: FitConfig,
                   batches: int = 8, *, encode) -> torch.Tensor:
    """globe.fit.warm_start.residual_atoms without the [N, r d] residual (encode: warm_start.encode)."""
    n = x.shape[0]
    atoms = atoms.float()
    bar = counter("greedy atoms", total=m)
    bar.update(min(atoms.shape[0], m))
    while atoms.shape[0] < m:
        codes = encode(x, atoms, cfg)[0] if atoms.shape[0] else None
        norms = torch.cat([_residual(x, atoms, codes, slice(lo, lo + ROWS)).norm(dim=1) for lo in range(0, n, ROWS)])
        k = min(max((m - atoms.shape[0] + batches - 1) // batches, 1), m - atoms.shape[0], n)
        worst = norms.topk(k).indices
        res = _residual(x, atoms, codes, worst)
        atoms = torch.cat([atoms, res / res.norm(dim=1, keepdim=True).clamp_min(1e-30)])
        bar.update(res.shape[0])
    bar.close()
    return atoms[:m]


def ksvd_sweep(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """globe.fit.warm_start.ksvd_sweep with the residual stored in x's dtype and each atom's users in chunks."""
    atoms, codes = atoms.clone(), codes.clone()
    n = x.shape[0]
    res = torch.empty_like(x)
    for lo in range(0, n, ROWS):
        res[lo:lo + ROWS] = _residual(x, atoms, codes, slice(lo, lo + ROWS)).to(res.dtype)
    for j in range(atoms.shape[0]):
        users = (codes[:, j] > 0).nonzero().squeeze(1)
        if users.numel() == 0:
            continue
        parts = users.split(ROWS)
        b = torch.zeros_like(atoms[j])
        for part in parts:                                                # power step from the old atom
            e = res[part].float() + codes[part, j, None] * atoms[j]
            b += (e @ atoms[j]) @ e
        b = b / b.norm().clamp_min(1e-30)
        for part in parts:
            e = res[part].float() + codes[part, j, None] * atoms[j]
            a = (e @ b).clamp_min(0)
            res[part] = (e - a[:, None] * b).to(res.dtype)
            codes[part, j] = a
        atoms[j] = b
    return atoms, codes


def _unit_rows(x: torch.Tensor, norms: torch.Tensor, rows) -> torch.Tensor:
    return x[rows].float() / norms[rows][:, None]


def _similarities(x: torch.Tensor, norms: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Cosines [N, k] of every unit row of x with the unit centroids cent [k, D]."""
    return torch.cat([_unit_rows(x, norms, slice(lo, lo + ROWS)) @ cent.T for lo in range(0, x.shape[0], ROWS)])


def kmeans_atoms(x: torch.Tensor, m: int, gen: torch.Generator, iters: int = 15, *, pad) -> torch.Tensor:
    """globe.fit.warm_start.kmeans_atoms without the fp32 and unit copies of x (pad: warm_start._pad)."""
    n = x.shape[0]
    norms = torch.cat([x[lo:lo + ROWS].float().norm(dim=1) for lo in range(0, n, ROWS)]).clamp_min(1e-30)
    k = min(m, n)
    cent = _unit_rows(x, norms, torch.randint(0, n, (1,), generator=gen))
    best = _similarities(x, norms, cent)[:, 0]
    for _ in range(1, k):                                                  # k-means++ seeding on 1 - cos
        dist = (1 - best).clamp_min(0)
        new = _unit_rows(x, norms, torch.multinomial(dist.cpu() + 1e-12, 1, generator=gen).to(x.device))
        cent = torch.cat([cent, new])
        best = torch.maximum(best, _similarities(x, norms, new)[:, 0])
    for _ in range(iters):
        sums = torch.zeros_like(cent)
        for lo in range(0, n, ROWS):
            unit = _unit_rows(x, norms, slice(lo, lo + ROWS))
            sums.index_add_(0, (unit @ cent.T).argmax(1), unit)
        empty = sums.norm(dim=1) == 0
        sums[empty] = cent[empty]
        cent = sums / sums.norm(dim=1, keepdim=True)
    return pad(cent, m, x, gen)


def ts_pca_atoms(x: torch.Tensor, m: int, gen: torch.Generator, *, signed) -> torch.Tensor:
    """globe.fit.warm_start.ts_pca_atoms with the selected rows upcast a column block at a time (signed:
    warm_start._signed)."""
    n, dim = x.shape
    acc = acc_dtype(x.device)
    norms = torch.cat([x[lo:lo + ROWS].float().norm(dim=1) for lo in range(0, n, ROWS)])
    keep = norms.topk(min(n, 4 * m)).indices.sort().values
    gram = torch.zeros(keep.numel(), keep.numel(), dtype=acc, device=x.device)
    for lo in range(0, dim, COLUMNS):
        block = x[keep, lo:lo + COLUMNS].to(acc)
        gram += block @ block.T
    evals, evecs = torch.linalg.eigh(gram)
    k = min((m + 1) // 2 + 1, keep.numel())
    top = evecs[:, -k:].flip(-1)                                           # [n_keep, k]
    scale = evals[-k:].flip(-1).clamp_min(1e-30).sqrt()[:, None]
    atoms = torch.empty(k, dim, device=x.device)
    for lo in range(0, dim, COLUMNS):
        atoms[:, lo:lo + COLUMNS] = ((top.T @ x[keep, lo:lo + COLUMNS].to(acc)) / scale).float()
    return signed(atoms, x, m)
