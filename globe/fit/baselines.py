"""Reference compressors at a matched parameter budget, for benchmarks and comparisons.

svd_baseline: per-expert truncated SVD (rank k per expert; k(p+d) params each).
per_layer_bank: a MoBE-style model: one bank per layer, dense softmax mixing over its atoms, trained with Adam on
(bank, logits, adapters) from an SVD start; parameters L*m*r*d + N*p*r + N*m.
"""
from __future__ import annotations

import logging
import math

import torch

from globe.fit.adapters import PHI, refit_adapters
from globe.fit.normalize import Normalizer
from globe.fit.warm_start import aligned_targets, svd_atoms

log = logging.getLogger(__name__)


def svd_rank_for_budget(p: int, d: int, budget: float) -> int:
    return max(1, math.floor(budget * p * d / (p + d)))


def svd_baseline(weights: torch.Tensor, budget: float, chunk: int = 64) -> dict:
    """Relative Frobenius error of the best rank-k approximation of every expert, k from the budget."""
    n, p, d = weights.shape
    k = svd_rank_for_budget(p, d, budget)
    tail, total = 0.0, 0.0
    for lo in range(0, n, chunk):
        s = torch.linalg.svdvals(weights[lo:lo + chunk].double())
        tail += float(s[:, k:].square().sum())
        total += float(s.square().sum())
    return {"rank": k, "params": n * k * (p + d), "rel_err": math.sqrt(tail / total)}


def per_layer_shape(n: int, layers: int, p: int, d: int, budget: float, r: int) -> int:
    """Atoms per layer bank so that L*m*r*d + N*p*r + N*m fits the budget (0 if it cannot)."""
    spare = budget * n * p * d - n * p * r
    return max(0, math.floor(spare / (layers * r * d + n)))


def per_layer_bank(weights: torch.Tensor, ids: torch.Tensor, budget: float, r: int, steps: int = 300,
                   lr: float = 5e-3, phi: str = "identity", seed: int = 0) -> dict:
    """MoBE-style per-layer banks with dense softmax codes, Adam-trained; returns error and parameter count."""
    n, p, d = weights.shape
    layers = ids[:, 0].unique()
    m = per_layer_shape(n, len(layers), p, d, budget, r)
    if m < 1:
        return {"m": 0, "r": r, "params": None, "rel_err": None}
    norm = Normalizer.fit(weights)
    gen = torch.Generator().manual_seed(seed)
    sq_err = torch.zeros(n, dtype=torch.float64)
    for layer in layers.tolist():
        idx = (ids[:, 0] == layer).nonzero().squeeze(1)
        sq_err[idx] = _fit_layer(weights[idx], Normalizer.fit(weights[idx]), m, r, steps, lr, phi, gen)
    rel = float((sq_err.sum() / norm.sq_norms.sum()).sqrt())
    params = len(layers) * m * r * d + n * p * r + n * m
    return {"m": m, "r": r, "params": params, "rel_err": rel}


def _fit_layer(weights, norm: Normalizer, m: int, r: int, steps: int, lr: float, phi: str, gen) -> torch.Tensor:
    """Adam on one layer's bank/logits/adapters; returns squared errors [E] in the original space."""
    e = weights.shape[0]
    w = norm.chunk(weights, 0, e)                                             # [E, p, d]
    targets = aligned_targets(weights, norm, r, e).reshape(e, -1)
    atoms = svd_atoms(targets, m, gen)
    if atoms.shape[0] < m:
        extra = torch.randn(m - atoms.shape[0], atoms.shape[1], generator=gen)
        atoms = torch.cat([atoms, extra / extra.norm(dim=1, keepdim=True)])
    bank = torch.nn.Parameter(atoms.view(m, r, -1).clone())
    logits = torch.nn.Parameter(torch.zeros(e, m))
    with torch.no_grad():
        start = PHI[phi]((torch.softmax(logits, -1) @ bank.flatten(1)).view(e, r, -1))
    adapters = torch.nn.Parameter(refit_adapters(w, start, 1e-6).adapters)
    opt = torch.optim.Adam([bank, logits, adapters], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        mixed = PHI[phi]((torch.softmax(logits, -1) @ bank.flatten(1)).view(e, r, -1))
        loss = (w - adapters @ mixed).square().sum() / w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        mixed = PHI[phi]((torch.softmax(logits, -1) @ bank.flatten(1)).view(e, r, -1))
        sq = (w - adapters @ mixed).square().sum((1, 2)).double()
    return sq * norm.scales.double() ** 2
