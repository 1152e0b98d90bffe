"""Plain quantization as a family: no low-rank part (bank.budget == 0), every expert's weights stored as its
quantized residual over a zero base (globe.fit.solvers.residual: GPTQ under the expert's routed Hessian with
calibration statistics, RTN without).

The zero base is the smallest GloBE family there is: one atom of rank 1, all zero, zero adapters and no non-zero
code, so the residual storage, its runtime path (R_e x dequantized on use), the formats, the validator and the byte
model serve plain quantization unchanged. Its overhead over the experts' packed residuals is the [N, p, 1] zero
adapters (packed, one fp16 scale and zero per row) and the per-expert scales, ids and code row pointers: about
(bits + 32) / d bits per routed weight.

    if plain_applies(cfg): fitted = plain_stage(problem)        # in place of shape, warm start, AM, VarPro
"""
from __future__ import annotations

import torch

from globe.fit.config import FitConfig

PLAIN_RANK = 1       # the zero base: m = r = 1


def plain_applies(cfg: FitConfig) -> bool:
    """A family with no low-rank part: budget 0 (only with quantized residuals; FitConfig.validate)."""
    return cfg.bank.budget == 0 and cfg.bank.m is None and cfg.bank.r is None


def zero_factors(n: int, p: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank [1, 1, d], adapters [n, p, 1], codes [n, 1]) all zero."""
    return (torch.zeros(PLAIN_RANK, PLAIN_RANK, d), torch.zeros(n, p, PLAIN_RANK), torch.zeros(n, PLAIN_RANK))
