"""Warm start `hybrid` (the default): SVD atoms (globe.fit.warm_starts.svd) for half of the bank, residual greedy
atoms for the rest, then K-SVD sweeps (globe.fit.warm_starts.greedy)."""
from __future__ import annotations

import torch

from globe.fit.warm_starts.base import register
from globe.fit.warm_starts.greedy import GreedyInit
from globe.fit.warm_starts.svd import svd_atoms, svd_seconds


@register
class HybridInit(GreedyInit):
    name = "hybrid"

    def first_atoms(self, x, m, gen, streamed: bool) -> torch.Tensor:
        return svd_atoms(x, (m + 1) // 2, gen)

    def start(self, m: int) -> int:
        return (m + 1) // 2

    def seconds(self, s, q) -> float:
        return svd_seconds(s, q) + super().seconds(s, q)
