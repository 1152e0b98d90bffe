"""The mixing step shared by fit, runtime and baselines: tilde_B_i = phi(sum_j alpha_ij B_j).

Codes come in two forms. Dense codes [N, m] (the fit's) mix with one matmul over the flattened bank. Sparse
codes (`SparseCodes`: a padded table indices [N, k], values [N, k], k = largest support, padding = atom 0 with
value 0; the runtime's) mix with one `embedding_bag` call, k * r * d multiply-adds per expert instead of
m * r * d, and no [U, k, r, d] gather is ever formed.

    mixed = compose(codes, bank, "silu")                    # [N, r, d]
    mixed = compose(sparse_codes(codes), bank, "silu")      # the same atoms from the sparse table
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

PHI = {"identity": lambda x: x, "silu": F.silu, "tanh": torch.tanh}


class SparseCodes(NamedTuple):
    """Codes as a padded sparse table: indices [N, k] int64, values [N, k] (padding: index 0, value 0)."""

    indices: torch.Tensor
    values: torch.Tensor


def sparse_codes(codes: torch.Tensor, min_width: int = 1) -> SparseCodes:
    """Dense codes [N, m] -> SparseCodes with k = max non-zeros per row (>= min_width; 0 only for a family with no
    base, globe.fit.engine.plain, whose codes are all zero and whose checkpoint then stores no code)."""
    nonzero = codes != 0
    k = max(int(nonzero.sum(1).max()) if codes.numel() else 0, min_width)
    # non-zeros first (stable, so atoms keep ascending order), then padding with value 0
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :k]   # [N, k]
    values = torch.gather(codes, 1, order)
    indices = torch.where(values != 0, order, torch.zeros_like(order))
    return SparseCodes(indices.long(), values)


def compose(codes: torch.Tensor | SparseCodes, bank: torch.Tensor, phi: str = "identity") -> torch.Tensor:
    """phi(sum_j alpha_ij B_j): codes [c, m] (dense) or SparseCodes [c, k], bank [m, r, d] -> [c, r, d]."""
    m, r, d = bank.shape
    if not isinstance(codes, SparseCodes):
        return PHI[phi]((codes @ bank.reshape(m, r * d)).view(codes.shape[0], r, d))
    if codes.indices.shape[0] == 0:
        return bank.new_zeros(0, r, d)
    if codes.indices.shape[1] == 0:                                   # no code (k = 0): every mixture is zero
        return PHI[phi](bank.new_zeros(codes.indices.shape[0], r, d))
    summed = F.embedding_bag(codes.indices, bank.reshape(m, r * d), per_sample_weights=codes.values.to(bank.dtype),
                             mode="sum")                                          # [c, r * d]
    return PHI[phi](summed.view(codes.indices.shape[0], r, d))
