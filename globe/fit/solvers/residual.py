"""Quantized residuals: each expert's remainder R_i = W_i - W_hat_i after its (quantized) factors, stored
weight-only quantized [N, p, d] with groups along d, so that the model computes W_hat_i + dequant(R_i).

With calibration statistics (right factors x -> x R_i of the activation objective, C_i = R_i R_i^T the expert's
routed input second moment) the residual is quantized with GPTQ under H_i = C_i, the error the expert's output
sees; without, by round to nearest (GPTQ under H = I is the same rounding without feedback).

    qt, err = quantize_residual(weights, fam, QuantConfig(bits=3, group=128), right)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from globe.core.result import FamilyFit
from globe.progress import progress
from globe.quant import QuantConfig, QuantizedTensor, quantize
from globe.quant.tensor import concat_rows

Right = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x [c, rows, d], experts [c]) -> x R_i
RESIDUAL_CHUNK = 16            # experts per GPTQ batch (its fp64 copies and Hessians: ~8 (2 p d + 4 d^2) bytes each)


@dataclass
class QuantizedResidual:
    """A family's quantized residuals and each expert's squared errors before and after adding them."""

    residual: QuantizedTensor        # [N, p, d], groups along d
    sq_err_before: torch.Tensor      # [N] fp64 ||W_i - W_hat_i||^2 (factors only)
    sq_err: torch.Tensor             # [N] fp64 ||W_i - W_hat_i - dequant(R_i)||^2
    weighted_sq_err: torch.Tensor    # [N] fp64 ||(W_i - W_hat_i - dequant(R_i)) R_i||^2 (= sq_err in weight space)


def residual_method(right: Right | None) -> str:
    """gptq under each expert's routed Hessian with statistics, rtn without."""
    return "rtn" if right is None else "gptq"


def expert_hessians(right: Right, experts: torch.Tensor, d: int) -> torch.Tensor:
    """H_i = R_i R_i^T [c, d, d] fp64 of the given experts, from the right factors (R_i = right(I))."""
    eye = torch.eye(d, dtype=torch.float64).expand(experts.numel(), d, d).contiguous()
    factors = right(eye, experts).double()                                           # [c, d, k]
    return factors @ factors.transpose(1, 2)


def quantize_residual(weights: torch.Tensor, fam: FamilyFit, cfg: QuantConfig, right: Right | None = None,
                      chunk: int = RESIDUAL_CHUNK, label: str = "residual",
                      hessians: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> QuantizedResidual:
    """weights [N, p, d] (a tensor or a lazy reader; fam's expert order) and fam (its factors as the model computes
    with them, fam.quant without a residual) -> QuantizedResidual; cfg.method is replaced by residual_method.
    hessians(experts) -> [c, d, d]: the GPTQ Hessians (the objective's undamped second moments,
    Objective.expert_hessians); None, or where it returns None: R_i R_i^T from the right factors."""
    n, p, d = weights.shape
    cfg = QuantConfig(method=residual_method(right), bits=cfg.bits, group=cfg.group)
    parts: list[QuantizedTensor] = []
    before, after, weighted = (torch.empty(n, dtype=torch.float64) for _ in range(3))
    for lo in progress(range(0, n, chunk), desc=label):
        hi = min(lo + chunk, n)
        experts = torch.arange(lo, hi)
        w = weights[lo:hi].float()
        base = fam.reconstruct(slice(lo, hi)).float()                               # [c, p, d]
        rest = w - base
        h = None if right is None else (hessians and hessians(experts))
        h = expert_hessians(right, experts, d) if right is not None and h is None else h
        qt = quantize(rest, cfg, h)
        parts.append(qt)
        err = (rest - qt.dequantize()).double()
        before[lo:hi] = rest.double().square().sum((1, 2))
        after[lo:hi] = err.square().sum((1, 2))
        weighted[lo:hi] = after[lo:hi] if right is None else right(err, experts).double().square().sum((1, 2))
    return QuantizedResidual(concat_rows(parts), before, after, weighted)
