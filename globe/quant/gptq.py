"""GPTQ (Frantar et al. 2022), the reference algorithm, batched over the leading axes (e.g. experts).

Minimises sum_i ||(W_i - Q_i) X_i||^2 with H_i = X_i X_i^T (cols x cols): columns are quantized one by one in
their natural order, each column's error, divided by the diagonal of the upper Cholesky factor U of H^-1, is fed
back into the columns not yet quantized (within a block of `block` columns at once, then to the rest in one lazy
batch update); H is damped by damp * mean(diag H); a group's scale and zero come from the group's current
(error-updated) weights when its first column is reached. Inputs that never occur (diag H = 0) get H_jj = 1 and a
zero weight, as in the reference.
"""
from __future__ import annotations

import torch

from globe.errors import NumericalError
from globe.quant.config import QuantConfig
from globe.quant.registry import register
from globe.quant.tensor import QuantizedTensor, minmax_params, pack, quantize_codes


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): upper Cholesky factor of (H + damp * mean diag * I)^-1 [..., c, c] (fp64) and dead inputs [..., c]."""
    h = hessian.double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    diag.masked_fill_(dead, 1.0)
    mean = diag.mean(dim=-1, keepdim=True)
    diag.add_(damp * mean)
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise NumericalError("gptq: the damped Hessian is not positive definite; raise QuantConfig.damp")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True), dead


@register("gptq", needs_hessian=True)
def quantize_gptq(weights: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """GPTQ of weights [..., rows, cols] with H [..., cols, cols]; groups of config.group columns."""
    lead, (rows, cols) = weights.shape[:-2], weights.shape[-2:]
    w = weights.reshape(-1, rows, cols).double().clone()                            # [B, rows, cols]
    u, dead = inverse_hessian_factor(hessian.reshape(-1, cols, cols), config.damp)  # [B, cols, cols], [B, cols]
    w.masked_fill_(dead[:, None, :], 0.0)
    group, levels = config.group, config.levels
    block = -(-max(config.block, group) // group) * group                            # a multiple of group
    n_groups = -(-cols // group)
    codes = torch.zeros_like(w)
    scales = torch.zeros(w.shape[0], rows, n_groups, dtype=torch.float16)
    zeros = torch.zeros_like(scales)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1, err = w[:, :, start:stop].clone(), torch.zeros(w.shape[0], rows, stop - start, dtype=w.dtype)
        u1 = u[:, start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group == 0:                                                    # groups never straddle blocks
                g = col // group
                scales[:, :, g], zeros[:, :, g] = minmax_params(w1[:, :, i:i + group], levels)
            s, z = scales[:, :, col // group].double(), zeros[:, :, col // group].double()
            q = quantize_codes(w1[:, :, i], s, z, levels)
            codes[:, :, col] = q
            e = (w1[:, :, i] - (q - z) * s) / u1[:, i, i][:, None]                 # [B, rows]
            w1[:, :, i:] -= e[:, :, None] * u1[:, i, i:][:, None, :]
            err[:, :, i] = e
        w[:, :, stop:] -= err @ u[:, start:stop, stop:]
    return pack(codes.reshape(*lead, rows, cols), scales.reshape(*lead, rows, n_groups),
                zeros.reshape(*lead, rows, n_groups), config.bits, group)
