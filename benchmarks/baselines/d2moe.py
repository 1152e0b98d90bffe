"""D2-MoE (lliai/D2MoE, `model/merge_qwen.py` + `preprocess/get_fisher.py` / `get_scale.py`), gate/up families.

Per MoE layer, as `Merge_QwenMoE.merge_experts` with merge_method="fisher" (the default of D2-qwen.py):
  base      W_b = sum_e (F_e f_e) W_e / sum_e (F_e f_e), elementwise: F_e [p, d] the Fisher information of expert
            e's weight (mean over calibration batches of the squared gradient of the LM loss, get_fisher.py's
            non-diagonal branch), f_e its routing frequency (tokens routed to e, get_expert_freq.py).
  deltas    D_e = W_e - W_b, each truncated by SVD to rank k (`svd_delta`): weight space (svd_scale=None) or
            whitened by SVD-LLM with the Cholesky factor S_e of expert e's routed-token Gram (get_scale.py hooks
            each expert's gate_proj input; we reuse globe calibrate's `hidden.expert_sum`, the same sums).
  share_V   (delta_share_V=True) the E deltas stacked to [E p, d] and truncated once: per-expert U_e [p, k] and
            one V [k, d] per layer; whitened with the frequency-weighted mean of the experts' Cholesky factors
            (merge_qwen.py averages the factors S_e, not the Grams; we do the same).
Stored per layer: base p d + E k (p + d) (per-expert deltas) or p d + E p k + k d (share_V).

What we changed: the original gets the delta rank from a ratio (`int(p d ratio / (p + d))`, the same k for the
share_V variant); we solve k from the stored-parameter budget of each variant separately, so that share_V gets
the larger rank its smaller footprint allows (equal stored params against every other method). D2-MoE's optional
structured pruning of the base (pp_ratio, the `probe` path) is not used (pp_ratio = 0). Factors are kept in
float32 here; the harness rounds the reconstruction to the checkpoint dtype (the original stores bf16 factors).
Without Fisher information the base falls back to the frequency-weighted mean (merge_method="freq").
"""
from __future__ import annotations

import math

import torch

from benchmarks.baselines.common import PeerFit, check_shape, lowrank
from benchmarks.baselines.svd import whitened_lowrank, whitener


def d2_rank(e: int, p: int, d: int, budget: float, share_v: bool) -> int:
    """Largest delta rank whose stored params (base included) fit `budget` of the layer's E p d."""
    spare = budget * e * p * d - p * d
    k = math.floor(spare / (e * p + d)) if share_v else math.floor(spare / (e * (p + d)))
    return max(0, min(k, d if share_v else min(p, d)))


def d2_params(layers: int, e: int, p: int, d: int, k: int, share_v: bool) -> int:
    per_layer = p * d + (e * p * k + k * d if share_v else e * k * (p + d))
    return layers * per_layer


def fisher_base(weights: torch.Tensor, fisher: torch.Tensor | None, freq: torch.Tensor) -> torch.Tensor:
    """[E, p, d] experts of one layer -> [p, d] base: elementwise (Fisher x frequency)-weighted mean."""
    f = freq.double().clamp_min(0).view(-1, 1, 1)                           # [E, 1, 1]
    scale = f if fisher is None else fisher.double() * f                    # [E, p, d] or [E, 1, 1]
    total = scale.sum(0)
    if fisher is not None:
        total = total.clamp_min(torch.finfo(torch.float64).tiny)
    return ((weights.double() * scale).sum(0) / total).float()


def _deltas(delta: torch.Tensor, k: int, grams: torch.Tensor | None, freq: torch.Tensor, share_v: bool):
    """Rank-k reconstruction of one layer's [E, p, d] deltas (per expert, or with one shared V)."""
    e, p, d = delta.shape
    if k == 0:
        return torch.zeros_like(delta)
    if not share_v:
        if grams is None:
            return lowrank(delta, k)
        s, s_inv = whitener(grams)
        return whitened_lowrank(delta, s, s_inv, k)
    stacked = delta.reshape(e * p, d)                                       # [E p, d]
    if grams is None:
        return lowrank(stacked, k).view(e, p, d)
    s, _ = whitener(grams)                                                  # [E, d, d]
    w = freq.double().clamp_min(0)
    s_mean = (s * (w / w.sum()).view(-1, 1, 1)).sum(0)                      # [d, d] freq-weighted mean factor
    s_mean_inv = torch.linalg.inv(s_mean)
    return whitened_lowrank(stacked, s_mean, s_mean_inv, k).view(e, p, d)


def d2moe(weights: torch.Tensor, budget: float, freq: torch.Tensor, fisher: torch.Tensor | None = None,
          grams: torch.Tensor | None = None, share_v: bool = False) -> PeerFit:
    """D2-MoE of a [L, E, p, d] family. freq: [L, E] routed-token counts; fisher: [L, E, p, d] or None;
    grams: [L, E, d, d] routed-token Grams for the whitened variant, None for weight space."""
    layers, e, p, d = check_shape(weights)
    k = d2_rank(e, p, d, budget, share_v)
    out = torch.empty_like(weights, dtype=torch.float32)
    for layer in range(layers):
        base = fisher_base(weights[layer], None if fisher is None else fisher[layer], freq[layer])   # [p, d]
        delta = weights[layer].float() - base
        out[layer] = base + _deltas(delta, k, None if grams is None else grams[layer], freq[layer], share_v)
    info = {"rank": k, "share_v": share_v, "whitened": grams is not None, "fisher": fisher is not None}
    return PeerFit(out, d2_params(layers, e, p, d, k, share_v), info)
