"""Sparse codes and the mixing step of the runtime: tilde_B_i = phi(sum_j alpha_ij B_j) for selected experts.

Codes are kept as a padded sparse table (indices [E, k], values [E, k], k = largest support, padding = atom 0 with
value 0), so mixing one expert costs k * r * d multiply-adds instead of m * r * d. The weighted sum is one
`embedding_bag` call over the flattened bank [m, r * d]: no [U, k, r, d] gather is ever formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from globe.fit.adapters import PHI
from globe.fit.result import FamilyFit


def sparse_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes [N, m] -> (indices [N, k] int64, values [N, k]) with k = max non-zeros per row (>= 1)."""
    nonzero = codes != 0
    k = max(int(nonzero.sum(1).max()) if codes.numel() else 0, 1)
    # non-zeros first (stable, so atoms keep ascending order), then padding with value 0
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :k]   # [N, k]
    values = torch.gather(codes, 1, order)
    indices = torch.where(values != 0, order, torch.zeros_like(order))
    return indices.long(), values


def mix(indices: torch.Tensor, values: torch.Tensor, bank: torch.Tensor, phi: str = "identity") -> torch.Tensor:
    """phi(sum_j values[u, j] * bank[indices[u, j]]) for U experts: indices/values [U, k], bank [m, r, d] -> [U, r, d]."""
    m, r, d = bank.shape
    if indices.shape[0] == 0:
        return bank.new_zeros(0, r, d)
    summed = F.embedding_bag(indices, bank.reshape(m, r * d), per_sample_weights=values.to(bank.dtype),
                             mode="sum")                                          # [U, r * d]
    return PHI[phi](summed.view(-1, r, d))


def reconstruct_rows(fam: FamilyFit, rows: torch.Tensor, dtype: torch.dtype | None = None,
                     factor_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat = A_i tilde_B_i for the given rows of a family: [len(rows), p, d] in `dtype`.

    The factors are first rounded to `factor_dtype` (the runtime's storage dtype, when given), then everything is
    computed in fp32 exactly as GlobeExperts.reconstruct does, so the runtime `dense` mode and the dense export
    agree bit for bit.
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t.to(factor_dtype) if factor_dtype is not None else t).float()

    indices, values = sparse_codes(fam.codes[rows].float())
    mixed = mix(indices, cast(values), cast(fam.bank), fam.phi)                      # [n, r, d]
    weights = cast(fam.adapters[rows]) @ mixed                                       # [n, p, d]
    return weights if dtype is None else weights.to(dtype)
