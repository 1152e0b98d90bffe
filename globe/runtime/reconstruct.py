"""Dense weights of selected experts from an artifact family, computed exactly as the runtime computes them.

    weights = reconstruct_rows(fam, rows, factor_dtype=torch.bfloat16)     # [len(rows), p, d]
"""
from __future__ import annotations

import torch

from globe.core.mixing import SparseCodes, compose, sparse_codes
from globe.core.result import FamilyFit


def reconstruct_rows(fam: FamilyFit, rows: torch.Tensor, dtype: torch.dtype | None = None,
                     factor_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat = A_i tilde_B_i (+ the quantized residual R_i where the fit stores one) for the given rows of a family:
    [len(rows), p, d] in `dtype`.

    The factors are first rounded to `factor_dtype` (the runtime's storage dtype, when given), then everything is
    computed in fp32 exactly as GlobeExperts.reconstruct does, so the runtime `dense` mode and the dense export
    agree bit for bit. A quantized part (fam.quant) is stored packed, not in the factor dtype: its dequantized fp32
    values are used as they are, as the runtime dequantizes them.
    """
    def cast(t: torch.Tensor, part: str | None = None) -> torch.Tensor:
        return (t.to(factor_dtype) if factor_dtype is not None and part not in fam.quant else t).float()

    indices, values = sparse_codes(fam.codes[rows].float())
    mixed = compose(SparseCodes(indices, cast(values)), cast(fam.bank, "bank"), fam.phi)     # [n, r, d]
    weights = cast(fam.adapters[rows], "adapters") @ mixed                                   # [n, p, d]
    if "residual" in fam.quant:                                  # + R_i, dequantized (fp32) as the runtime does
        weights = weights + fam.quant["residual"].rows(rows)
    return weights if dtype is None else weights.to(dtype)
