"""Warm start `ts_pca`: tall-skinny PCA of the highest-energy targets (their n x n Gram), eigenvectors mapped
back to signed atoms; the streamed variant accumulates the Gram and the atoms over column blocks of bf16 targets."""
from __future__ import annotations

import torch

from globe.device import acc_dtype
from globe.fit.warm_starts.base import (COLUMNS, F4, F8, ROWS, WarmStartInit, WarmStartOptions, _pad, _signed,
                                        encode_seconds, register)
from globe.fit.warm_starts.svd import svd_seconds


def ts_pca_atoms(x: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """Tall-skinny PCA: the highest-energy rows' Gram matrix (n x n), eigenvectors mapped back to atoms."""
    keep = x.norm(dim=1).topk(min(x.shape[0], 4 * m)).indices.sort().values
    xs = x[keep].to(acc_dtype(x.device))                                   # float64 (float32 on MPS)
    evals, evecs = torch.linalg.eigh(xs @ xs.T)
    k = min((m + 1) // 2 + 1, xs.shape[0])
    top = evecs[:, -k:].flip(-1)                                           # [n, k]
    atoms = (top.T @ xs) / evals[-k:].flip(-1).clamp_min(1e-30).sqrt()[:, None]
    return _signed(atoms.float(), x, m)


def streamed_ts_pca_atoms(x: torch.Tensor, m: int, gen: torch.Generator, *, signed=_signed) -> torch.Tensor:
    """ts_pca_atoms with the selected rows upcast a column block at a time."""
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


@register
class TSPCAInit(WarmStartInit):
    name = "ts_pca"

    def atoms(self, x, m, gen, options: WarmStartOptions, streamed: bool) -> torch.Tensor:
        return _pad((streamed_ts_pca_atoms if streamed else ts_pca_atoms)(x, m, gen), m, x, gen)

    def memory(self, s, streamed: bool) -> int:
        dim, keep = s.r * s.d, min(s.n, 4 * s.m)
        if streamed:
            return 2 * keep * min(COLUMNS, dim) * F8 + ((s.m + 1) // 2 + 1) * dim * F4 + 2 * s.bank
        return keep * dim * F8 * 2 + s.bank

    def seconds(self, s, q) -> float:
        return svd_seconds(s, q) + encode_seconds(s, q)
