"""The declared costs (globe.fit.costs) of the shape and warm_start phases (globe.fit.engine.shape's stages):
the experts' factors and the budget solver's probes, the gauge-aligned targets, then the init, which declares its
own part (WarmStartInit.memory / seconds)."""
from __future__ import annotations

import torch

from globe.fit.costs import F4, F8, chunk_read, declare_cost, read_seconds, svd_work
from globe.fit.warm_starts.base import WARM_STARTS
from globe.fit.warm_starts.targets import LARGE_MATRIX, target_dtype


def shape_memory(s) -> int:
    """pick_shape when the budget solver runs: expert_factors (one full SVD per expert, factors of the largest
    probed rank kept), then per probed rank the aligned targets and the Gram of their rows (fp64)."""
    if not s.probe_ranks:
        return 0
    rmax, k = max(s.probe_ranks), min(s.p, s.d)
    held = s.n * k * F4 + s.targets(rmax) + s.d * s.d * (F8 + F4)           # svals, factors, covariance
    cpd = s.c * s.p * s.d
    factor = F4 * cpd + max(chunk_read(s), svd_work(s, s.p, s.d), F4 * cpd + s.d * s.d * F4)   # chunk w + SVD
    probe = 0
    for r in s.probe_ranks:
        fp32 = target_dtype(s.n, r, s.d) == torch.float32
        gram = (2 * s.n * r * s.d * F8) if fp32 else 2 * 32 * r * s.d * F8   # x.to(fp64) twice, or row blocks
        probe = max(probe, s.targets(r) + gram + 2 * s.n * s.n * F8)
    return held + max(factor, probe + 2 * s.d * s.d * F8)


def _target_work(s) -> int:
    """aligned_targets' chunk work beyond the targets: fp32 chunk, its top-r factors, the covariance."""
    cpd = s.c * s.p * s.d
    exact = s.p * s.d < LARGE_MATRIX or 4 * s.r > min(s.p, s.d)
    top = svd_work(s, s.p, s.d) if exact else F4 * s.c * (2 * s.p * (s.r + 16) + 2 * (s.r + 16) * s.d)
    return F4 * cpd + max(chunk_read(s) - F4 * cpd, top + F4 * s.c * s.r * s.d) + 2 * s.d * s.d * F8


def warm_start_memory(s) -> int:
    """Aligned targets (from the solver's factors, which are still held, or from a fresh pass), then the init on
    the stacked targets x [N, r d]: fp32 targets get the in-memory inits (fp32 residual copies of `greedy` /
    `hybrid`, k-means' unit copy), bf16 targets the streamed ones: each warm start declares its own
    (WarmStartInit.memory)."""
    t, big = s.targets(), s.n * s.r * s.d * F4                                # T and one fp32 copy of it
    if s.probe_ranks and s.r <= max(s.probe_ranks):
        make = s.targets(max(s.probe_ranks)) + t + 3 * F4 * s.c * s.r * s.d
    else:
        make = t + _target_work(s)
    init = WARM_STARTS.get(s.init)().memory(s, streamed=t < big)              # the warm start's own cost
    return max(make, t + init + s.n * s.m * F4 * s.restarts)


def shape_seconds(s, q) -> float:
    if not s.probe_ranks:
        return 0.0
    n, p, d = s.n, s.p, s.d
    probes = sum(n * (q.align + 2 * r * r * d / q.wd32) + 2 * n * n * r * d / (q.wd32 / 2) for r in s.probe_ranks)
    return read_seconds(s, q) + n * (q.svd + 2 * p * d * d / q.wd32) + probes


def warm_start_seconds(s, q) -> float:
    n, p, d, r, m = s.n, s.p, s.d, s.r, s.m
    align = n * (q.align + 2 * r * r * d / q.wd32)
    if s.probe_ranks and r <= max(s.probe_ranks):
        targets = align
    else:
        exact = p * d < LARGE_MATRIX or 4 * r > min(p, d)
        top = q.svd if exact else 2 * 6 * p * d * (r + 16) / q.wd32
        targets = read_seconds(s, q) + n * (top + 2 * p * d * d / q.wd32) + align
    init = WARM_STARTS.get(s.init)().seconds(s, q)                       # the warm start's own cost
    return targets + init * s.restarts


declare_cost("shape", shape_memory, shape_seconds)
declare_cost("warm_start", warm_start_memory, warm_start_seconds)
