"""HQQ (Badri & Shaji 2023): half-quadratic optimisation of the zero points, no calibration data.

Starting from min-max scales and zeros (without forcing 0 into the range), it minimises the l_p error
(p = config.lp < 1, robust to outliers) of each group over the zero point by alternating
  W_e = shrink_p(W - (Q - z) s)                      (proximal step of the l_p norm, penalty beta)
  z   = mean over the group of (Q - (W - W_e) / s)   (closed form)
  Q   = clamp(round(W / s + z))
with beta growing by kappa each iteration; the iterate with the lowest mean absolute error is kept. Zeros are real
numbers (stored fp16); scales stay the min-max ones.
"""
from __future__ import annotations

import torch

from globe.quant.config import QuantConfig
from globe.quant.registry import register
from globe.quant.tensor import SCALE_DTYPE, QuantizedTensor, grouped, minmax_params, pack, quantize_codes, ungrouped


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold: argmin_y |y|^p + beta/2 (y - x)^2, approximately (HQQ's closed form)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


@register("hqq")
def quantize_hqq(weights: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    g = grouped(weights.float(), config.group)                                  # [..., rows, groups, group]
    levels = config.levels
    scale, zero = minmax_params(g, levels, include_zero=False)
    s = scale.float()[..., None]
    z = zero.float()[..., None]
    best_z, best_err = z.clone(), float("inf")
    beta = config.beta
    for _ in range(config.iters + 1):
        z16 = z.to(SCALE_DTYPE).float()
        q = quantize_codes(g, s, z16, levels)
        residual = g - (q - z16) * s
        err = float(residual.abs().mean())
        if err < best_err:
            best_z, best_err = z16.clone(), err
        w_e = shrink_lp(residual, beta, config.lp)
        z = (q - (g - w_e) / s).mean(dim=-1, keepdim=True)
        beta *= config.kappa
    codes = quantize_codes(g, s, best_z, levels)
    return pack(ungrouped(codes, weights.shape[-1]), scale, best_z[..., 0], config.bits, config.group)
