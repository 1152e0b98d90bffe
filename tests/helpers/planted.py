"""Planted GloBE problems: W_i = A_i @ sum_j alpha_ij B_j with a known bank, sparse codes and random adapters."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Planted:
    weights: torch.Tensor   # [N, p, d]
    codes: torch.Tensor     # [N, m] exactly k non-zeros per row
    bank: torch.Tensor      # [m, r, d] unit-Frobenius atoms
    adapters: torch.Tensor  # [N, p, r]
    ids: torch.Tensor       # [N, 2]


def make_planted(n: int = 96, p: int = 32, d: int = 48, m: int = 8, r: int = 8, k: int = 2, seed: int = 0,
                 experts_per_layer: int = 8) -> Planted:
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=gen)
    bank /= bank.flatten(1).norm(dim=1)[:, None, None]
    codes = torch.zeros(n, m)
    for i in range(n):
        codes[i, torch.randperm(m, generator=gen)[:k]] = torch.rand(k, generator=gen) + 0.5
    adapters = torch.randn(n, p, r, generator=gen)
    weights = adapters @ (codes @ bank.flatten(1)).view(n, r, d)
    ids = torch.stack([torch.arange(n) // experts_per_layer, torch.arange(n) % experts_per_layer], 1)
    return Planted(weights, codes, bank, adapters, ids)


def same_support_up_to_permutation(fit_codes: torch.Tensor, true_codes: torch.Tensor) -> bool:
    """True when the fitted usage pattern equals the planted one after relabelling the atoms."""
    used_fit, used_true = (fit_codes != 0).float(), (true_codes != 0).float()
    perm = (used_fit.T @ used_true).argmax(1)            # fitted atom -> planted atom with most shared experts
    return len(set(perm.tolist())) == true_codes.shape[1] and bool((used_fit == used_true[:, perm]).all())
