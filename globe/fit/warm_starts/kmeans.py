"""Warm start `kmeans`: spherical k-means++ centroids of the unit targets (cosine similarity), padded; the
streamed variant forms unit rows chunk by chunk and keeps a running max similarity for the seeding."""
from __future__ import annotations

import torch

from globe.fit.warm_starts.base import ROWS, WarmStartInit, WarmStartOptions, _pad, encode_seconds, register


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


def _unit_rows(x: torch.Tensor, norms: torch.Tensor, rows) -> torch.Tensor:
    return x[rows].float() / norms[rows][:, None]


def _similarities(x: torch.Tensor, norms: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Cosines [N, k] of every unit row of x with the unit centroids cent [k, D]."""
    return torch.cat([_unit_rows(x, norms, slice(lo, lo + ROWS)) @ cent.T for lo in range(0, x.shape[0], ROWS)])


def streamed_kmeans_atoms(x: torch.Tensor, m: int, gen: torch.Generator, iters: int = 15, *, pad=_pad) -> torch.Tensor:
    """kmeans_atoms without the fp32 and unit copies of x."""
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


@register
class KMeansInit(WarmStartInit):
    name = "kmeans"

    def atoms(self, x, m, gen, options: WarmStartOptions, streamed: bool) -> torch.Tensor:
        return (streamed_kmeans_atoms if streamed else kmeans_atoms)(x, m, gen)

    def memory(self, s, streamed: bool) -> int:
        big = s.n * s.r * s.d * 4
        return 2 * s.bank + 3 * min(ROWS, s.n) * s.r * s.d * 4 if streamed else big + s.bank

    def seconds(self, s, q) -> float:
        nd, m = s.n * s.r * s.d, s.m
        return m * nd * 8 / q.stream + 15 * (2 * nd * m / q.bank + 3 * nd * 4 / q.stream) + encode_seconds(s, q)
