"""Fit metrics: errors (overall / per layer / per expert), energy, bank effective rank and coherence, code
support, entropy and atom popularity."""
from __future__ import annotations

import torch

GRAM_METRICS_BYTES = 2**28     # fp64 banks above this get their metrics from the m x m Gram (no fp64 copy)


def bank_metrics(bank: torch.Tensor) -> dict:
    """Effective rank (exp entropy of normalised singular values) and mutual coherence of unit atoms."""
    if bank.numel() * 8 > GRAM_METRICS_BYTES:
        return _gram_bank_metrics(bank)
    flat = bank.reshape(bank.shape[0], -1).double()
    s = torch.linalg.svdvals(flat)
    return _metrics_from(s, flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300))


def _metrics_from(s: torch.Tensor, unit: torch.Tensor | None, cos: torch.Tensor | None = None) -> dict:
    prob = s / s.sum().clamp_min(1e-300)
    eff_rank = float(torch.exp(-(prob * prob.clamp_min(1e-300).log()).sum()))
    cos = (unit @ unit.T if cos is None else cos).abs().fill_diagonal_(0)
    return {"bank_effective_rank": eff_rank, "coherence": float(cos.max()) if cos.shape[0] > 1 else 0.0}


def _gram_bank_metrics(bank: torch.Tensor, columns: int = 2**16) -> dict:
    """bank_metrics of a large bank from G = B B^T (fp64, accumulated over column blocks): singular values
    sqrt(eig G), cosines G_ij / sqrt(G_ii G_jj)."""
    flat = bank.reshape(bank.shape[0], -1)
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for lo in range(0, flat.shape[1], columns):
        block = flat[:, lo:lo + columns].double()
        gram += block @ block.T
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return _metrics_from(s, None, gram / norms[:, None] / norms[None, :])


def code_metrics(codes: torch.Tensor) -> dict:
    """Support statistics, mean code entropy (nats) and atom popularity (experts using each atom)."""
    support = (codes != 0).sum(-1).float()
    prob = codes.abs() / codes.abs().sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(prob * prob.clamp_min(1e-30).log()).sum(-1)
    popularity = (codes != 0).sum(0)
    return {"median_support": float(support.median()), "mean_support": float(support.mean()),
            "max_support": int(support.max()), "min_support": int(support.min()),
            "code_entropy": float(entropy.mean()), "nnz_codes": int((codes != 0).sum()),
            "atom_popularity": popularity.tolist(), "unused_atoms": int((popularity == 0).sum())}


def error_metrics(sq_err: torch.Tensor, sq_norms: torch.Tensor, ids: torch.Tensor) -> dict:
    """Relative Frobenius errors from per-expert squared errors [N] and ||W_i||^2 [N] (original space)."""
    sq_err, sq_norms = sq_err.double().cpu(), sq_norms.double().cpu()
    rel = float((sq_err.sum() / sq_norms.sum()).sqrt())
    per_expert = (sq_err / sq_norms).sqrt()
    layers = ids[:, 0].cpu()
    per_layer = {int(l): float((sq_err[layers == l].sum() / sq_norms[layers == l].sum()).sqrt())
                 for l in layers.unique()}
    return {"rel_err": rel, "energy_captured": 1.0 - rel**2, "rel_err_per_layer": per_layer,
            "rel_err_per_expert": per_expert.tolist(), "rel_err_max_expert": float(per_expert.max())}
