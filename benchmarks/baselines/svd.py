"""Per-expert truncated SVD and per-expert whitened SVD (SVD-LLM) at a parameter budget.

per_expert_svd: W_e ~ U_k S_k V_k^T, k = floor(budget p d / (p + d)) per expert, stored k (p + d) per expert.

whitened_svd (SVD-LLM, Wang et al. 2024, as D2-MoE's `svd_delta(..., scale_type='svdllm')` applies it): with
G_e = X_e^T X_e the Gram of the tokens routed to expert e (summed, unweighted, as globe calibrate stores them in
`hidden.expert_sum`) and S_e its lower Cholesky factor (G_e = S_e S_e^T), truncate W_e S_e to rank k and map back
with S_e^{-1}: W_e ~ (W_e S_e)_k S_e^{-1}, which minimises ||(W_e - W'_e) X_e^T||_F over rank-k W'_e. Same k and
stored count as the plain SVD (S_e^{-1} is folded into V). Like D2-MoE's `process_scaling_matrix`, a Gram that is not
positive definite gets its eigenvalues clamped before the Cholesky factorisation; we clamp relative to the
largest eigenvalue (1e-6 * lambda_max) instead of D2's absolute 1e-5, since our Grams are sums over tokens whose
scale depends on the model.
"""
from __future__ import annotations

import math

import torch

from benchmarks.baselines.common import PeerFit, check_shape, lowrank


def svd_rank(p: int, d: int, budget: float) -> int:
    """Largest k with k (p + d) <= budget p d (at least 1, at most min(p, d))."""
    return max(1, min(min(p, d), math.floor(budget * p * d / (p + d))))


def svd_params(n: int, p: int, d: int, k: int) -> int:
    return n * k * (p + d)


def per_expert_svd(weights: torch.Tensor, budget: float) -> PeerFit:
    """Truncated SVD of every expert of a [L, E, p, d] family at `budget` (stored / dense params)."""
    layers, e, p, d = check_shape(weights)
    k = svd_rank(p, d, budget)
    out = torch.stack([lowrank(w, k) for w in weights])                      # [L, E, p, d]
    return PeerFit(out, svd_params(layers * e, p, d, k), {"rank": k})


def whitener(gram: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^{-1}) with S the lower Cholesky factor of the [.., d, d] Gram(s), eigenvalues clamped (float64)."""
    g = gram.double()
    g = (g + g.transpose(-1, -2)) / 2
    vals, vecs = torch.linalg.eigh(g)
    floor = rel_eps * vals[..., -1:].clamp_min(1e-30)
    g = (vecs * vals.maximum(floor)[..., None, :]) @ vecs.transpose(-1, -2)
    s = torch.linalg.cholesky((g + g.transpose(-1, -2)) / 2)
    eye = torch.eye(g.shape[-1], dtype=g.dtype).expand_as(g)
    return s, torch.linalg.solve_triangular(s, eye, upper=False)


def whitened_lowrank(w: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor, k: int) -> torch.Tensor:
    """(W S)_k S^{-1} for [.., p, d] weights and [.., d, d] factors; float32 result."""
    return (lowrank(w.double() @ s, k).double() @ s_inv).float()


def whitened_svd(weights: torch.Tensor, grams: torch.Tensor, budget: float) -> PeerFit:
    """SVD-LLM of every expert of a [L, E, p, d] family under its routed-token Gram grams[l, e] ([L, E, d, d])."""
    layers, e, p, d = check_shape(weights)
    if grams.shape != (layers, e, d, d):
        raise ValueError(f"grams must be [L, E, d, d] = {(layers, e, d, d)}, got {tuple(grams.shape)}")
    k = svd_rank(p, d, budget)
    out = torch.empty_like(weights, dtype=torch.float32)
    for layer in range(layers):
        s, s_inv = whitener(grams[layer])
        out[layer] = whitened_lowrank(weights[layer], s, s_inv, k)
    return PeerFit(out, svd_params(layers * e, p, d, k), {"rank": k})
