"""Plain quantization as a family: no low-rank part (bank.budget == 0), every expert's weights stored as its
quantized residual over no base (globe.fit.solvers.residual: GPTQ under the expert's routed Hessian with
calibration statistics, RTN without).

No base is a base of rank 0: one atom [1, 0, d] (an empty bank), adapters [N, p, 0] (empty) and codes [N, 1] with
no non-zero, so the residual storage, its runtime path (R_e x dequantized on use), the formats, the validator (rank
0 only beside residuals) and the byte model serve plain quantization unchanged, and the family's compressed
checkpoint stores exactly the experts' packed weights, per-expert quantization's bytes: its code width is k = 0
(globe.runtime.apply.family_codes: no code index or value; the validator allows k = 0 at rank 0 only), the expert
scales are folded and the ids implicit (the artifact of `globe fit` keeps 20 N + 8 bytes of that bookkeeping,
which --size does not count). A rank-0 base was chosen over a separate
family kind because every consumer already handles (bank, adapters, codes, residual); the kind "plain" would need
its own tensors, runtime path, validator and byte rows. (Before, a zero base of rank 1 cost (bits + 32) / d bits
per routed weight: 0.23 at d = 160.)

    if plain_applies(cfg): fitted = plain_stage(problem)        # in place of shape, warm start, AM, VarPro
"""
from __future__ import annotations

import torch

from globe.fit.config import FitConfig

PLAIN_ATOMS, PLAIN_RANK = 1, 0     # no base: one atom of rank 0 (empty bank and adapters)


def plain_applies(cfg: FitConfig) -> bool:
    """A family with no low-rank part: budget 0 (only with quantized residuals; FitConfig.validate)."""
    return cfg.bank.budget == 0 and cfg.bank.m is None and cfg.bank.r is None


def zero_factors(n: int, p: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank [1, 1, d], adapters [n, p, 1], codes [n, 1]) all zero."""
    return (torch.zeros(PLAIN_ATOMS, PLAIN_RANK, d), torch.zeros(n, p, PLAIN_RANK), torch.zeros(n, PLAIN_ATOMS))
