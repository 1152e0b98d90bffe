"""Round to nearest with min-max group scales (the range always holds 0, as in GPTQ's reference quantizer)."""
from __future__ import annotations

import torch

from globe.quant.config import QuantConfig
from globe.quant.registry import register
from globe.quant.tensor import QuantizedTensor, grouped, minmax_params, pack, quantize_codes, ungrouped


@register("rtn")
def quantize_rtn(weights: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """Every entry rounded to the nearest level of its group; |w - w_hat| <= scale / 2."""
    g = grouped(weights.float(), config.group)                        # [..., rows, groups, group]
    scale, zero = minmax_params(g, config.levels)                     # [..., rows, groups]
    codes = quantize_codes(g, scale[..., None], zero[..., None], config.levels)
    return pack(ungrouped(codes, weights.shape[-1]), scale, zero, config.bits, config.group)
