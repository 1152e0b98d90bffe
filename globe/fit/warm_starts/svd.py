"""Warm start `svd`: randomised truncated SVD of the stacked targets, its top right singular vectors as signed
atoms (+/- pairs), padded with perturbed targets; the same code streams bf16 targets (row-chunked products)."""
from __future__ import annotations

import torch

from globe.fit.warm_starts.base import (F4, WarmStartInit, WarmStartOptions, _pad, _signed, encode_seconds, register,
                                        rows_mm, rows_tmm)


def svd_atoms(x: torch.Tensor, m: int, gen: torch.Generator, oversample: int = 8, power: int = 3) -> torch.Tensor:
    """Randomised truncated SVD of stacked targets x [N, D]: top right singular vectors as signed atoms."""
    k = min((m + 1) // 2 + 1, *x.shape)
    probe = torch.randn(x.shape[1], min(k + oversample, x.shape[1]), generator=gen).to(x.device)
    q = torch.linalg.qr(rows_mm(x, probe)).Q                               # [N, k']
    for _ in range(power):
        q = torch.linalg.qr(rows_mm(x, rows_tmm(x, q))).Q
    _, _, vh = torch.linalg.svd(rows_tmm(x, q).T, full_matrices=False)
    return _signed(vh[:k], x, m)


def svd_memory(s, streamed: bool) -> int:
    """svd_atoms: probe, range and right factors [r d, k'] fp32 (+ 256 upcast rows of bf16 targets), atoms."""
    dim = s.r * s.d
    k = min((s.m + 1) // 2 + 1, s.n, dim) + 8
    return 3 * F4 * dim * k + (min(256, s.n) * dim * F4 if streamed else 0) + s.bank


def svd_seconds(s, q) -> float:
    nd = s.n * s.r * s.d
    k = min((s.m + 1) // 2 + 1, s.n, s.r * s.d) + 8
    return 2 * nd * k * 8 / q.bank + 6 * nd * 4 / q.stream


@register
class SVDInit(WarmStartInit):
    name = "svd"

    def atoms(self, x, m, gen, options: WarmStartOptions, streamed: bool) -> torch.Tensor:
        return _pad(svd_atoms(x, m, gen), m, x, gen)

    def memory(self, s, streamed: bool) -> int:
        return svd_memory(s, streamed)

    def seconds(self, s, q) -> float:
        return svd_seconds(s, q) + encode_seconds(s, q)
