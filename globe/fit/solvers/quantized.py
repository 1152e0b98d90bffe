"""Quantized factors that absorb their own rounding: the bank is quantized first, then each expert's adapter is
refitted exactly against the quantized mixed atoms and quantized with GPTQ error feedback.

For expert i with weights W_i [p, d], mixed atoms M_i = phi(sum_j alpha_ij B_j) [r, d] of the quantized bank and
an input second moment C_i = R_i R_i^T (R_i = I in weight space):
    A_i = W_i C_i M_i^T (M_i C_i M_i^T)^-1          (exact_adapters, in the whitened form W_i R_i, M_i R_i)
and the adapter's GPTQ Hessian is H_i = M_i C_i M_i^T: the adapter multiplies M_i x, whose second moment that is,
so GPTQ minimises ||(A_i - Q_i) M_i R_i||^2, the expert's own (weighted) error.
The bank's GPTQ uses one Hessian for every atom row (the experts' mean C, or I), so it quantizes [m * r, d] as one
batch. All sums in fp64.

    qb, qa, err = quantize_factors(weights, codes, bank, phi, QuantConfig(bits=4, group=64), right, bank_h)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from globe.core.mixing import compose
from globe.progress import progress
from globe.quant import NEEDS_HESSIAN, QuantConfig, QuantizedTensor, pack_bits, quantize

Right = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x [c, rows, d], experts [c]) -> x R_i


@dataclass
class QuantizedFactors:
    """A family's quantized bank and adapters with each expert's squared errors after quantization."""

    bank: QuantizedTensor         # [m, r, d], groups along d
    adapters: QuantizedTensor     # [N, p, r], groups along r
    sq_err: torch.Tensor          # [N] fp64 ||W_i - A_i M_i||^2 (weight space)
    sq_norms: torch.Tensor        # [N] fp64 ||W_i||^2
    weighted_sq_err: torch.Tensor  # [N] fp64 ||(W_i - A_i M_i) R_i||^2 (= sq_err in weight space)
    weighted_sq_norms: torch.Tensor  # [N] fp64 ||W_i R_i||^2


def exact_adapters(wr: torch.Tensor, mr: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [c, p, r], gram [c, r, r]) minimising ||(W - A M) R||^2 from wr = W R [c, p, k] and mr = M R [c, r, k]
    (fp64): A = wr mr^T (mr mr^T + ridge * mean diag * I)^-1; gram = mr mr^T (the adapter's GPTQ Hessian)."""
    gram = mr @ mr.transpose(1, 2)                                                     # [c, r, r]
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    damped = gram + ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * eye
    rhs = wr @ mr.transpose(1, 2)                                                      # [c, p, r]
    return torch.linalg.solve(damped, rhs.transpose(1, 2)).transpose(1, 2), gram


def exact_adapters_moments(weights: torch.Tensor, mixed: torch.Tensor, moments: torch.Tensor,
                           ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_adapters in the moment form: A_i = W_i C_i M_i^T (M_i C_i M_i^T)^-1 for weights [c, p, d], mixed
    [c, r, d] and C [c, d, d] (fp64); returns (A, M C M^T)."""
    cm = moments @ mixed.transpose(1, 2)                                               # [c, d, r]
    gram = mixed @ cm                                                                  # [c, r, r]
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    damped = gram + ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * eye
    return torch.linalg.solve(damped, (weights @ cm).transpose(1, 2)).transpose(1, 2), gram


def quantize_bank(bank: torch.Tensor, cfg: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """The bank [m, r, d] quantized along d; GPTQ-like methods under one Hessian [d, d] for every atom row
    (identity when None)."""
    m, r, d = bank.shape
    h = None
    if cfg.method in NEEDS_HESSIAN:
        h = (torch.eye(d, dtype=torch.float64) if hessian is None else hessian.double())[None]   # [1, d, d]
    qt = quantize(bank.reshape(1, m * r, d).float(), cfg, h)
    g = qt.groups
    return QuantizedTensor(qt.codes, qt.scales.view(m, r, g), qt.zeros.view(m, r, g), (m, r, d), qt.bits, qt.group)


def quantize_factors(weights: torch.Tensor, codes: torch.Tensor, bank: torch.Tensor, phi: str, cfg: QuantConfig,
                     right: Right | None = None, bank_hessian: torch.Tensor | None = None, chunk: int = 64,
                     label: str = "quantize") -> QuantizedFactors:
    """weights [N, p, d] (any float dtype; a tensor or a lazy reader sliced by chunks), codes [N, m], bank [m, r, d] -> QuantizedFactors.

    right(x, experts): x [c, rows, d] of the experts [c] times R_i (None: weight space, R_i = I)."""
    n, p, d = weights.shape
    qbank = quantize_bank(bank, cfg, bank_hessian)
    deq = qbank.dequantize().double()                                                  # [m, r, d]
    r = deq.shape[1]
    per_chunk = (p * r * cfg.bits) % 8 == 0            # each expert's codes end on a byte: pack chunk by chunk
    packed: list[torch.Tensor] = []
    ints = None if per_chunk else torch.empty(n, p, r, dtype=torch.uint8)
    groups = -(-r // cfg.group)
    scales = torch.empty(n, p, groups, dtype=torch.float16)
    zeros = torch.empty_like(scales)
    sq_err, sq_norm, wsq_err, wsq_norm = (torch.empty(n, dtype=torch.float64) for _ in range(4))
    needs_h = cfg.method in NEEDS_HESSIAN
    for lo in progress(range(0, n, chunk), desc=label):
        hi = min(lo + chunk, n)
        experts = torch.arange(lo, hi)
        w = weights[lo:hi].double()                                                    # [c, p, d]
        mixed = compose(codes[lo:hi].double(), deq, phi)                               # [c, r, d]
        wr = w if right is None else right(w, experts).double()
        mr = mixed if right is None else right(mixed, experts).double()
        adapters, gram = exact_adapters(wr, mr)
        qa = quantize(adapters.float(), cfg, gram if needs_h else None)
        if per_chunk:
            packed.append(qa.codes)
        else:
            ints[lo:hi] = qa.integer_codes().to(torch.uint8)
        scales[lo:hi], zeros[lo:hi] = qa.scales, qa.zeros
        a_hat = qa.dequantize().double()                                               # [c, p, r]
        sq_err[lo:hi] = (w - a_hat @ mixed).square().sum((1, 2))
        sq_norm[lo:hi] = w.square().sum((1, 2))
        wsq_err[lo:hi] = (wr - a_hat @ mr).square().sum((1, 2))
        wsq_norm[lo:hi] = wr.square().sum((1, 2))
    codes_out = torch.cat(packed) if per_chunk else pack_bits(ints, cfg.bits)
    qadapters = QuantizedTensor(codes_out, scales, zeros, (n, p, r), cfg.bits, cfg.group)
    qadapters.check("quantized adapters")
    return QuantizedFactors(qbank, qadapters, sq_err, sq_norm, wsq_err, wsq_norm)
