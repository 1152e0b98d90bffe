"""Quantization baselines and GloBE stacked with quantization, on [L, E, p, d] routed-expert families.

Every function returns a `Compressed`: the reconstructed family (what the model computes with) and the exact bytes
it stores, counted from globe.quant.QuantizedTensor.nbytes (packed codes + fp16 scales + fp16 zeros) and 2 bytes
per bf16 value. GloBE's sparse codes stay floating point: 2 bytes per non-zero value + 2 bytes per atom index, and
2 bytes per expert scale.

    quantized(w, cfg, h)                         RTN / HQQ / GPTQ of every expert (h: per-expert Hessians)
    globe_bf16(fam)                              GloBE's factors in bf16, as the runtime stores them
    globe_after(fam, cfg)                        (a) bank and adapters quantized after the fit
    globe_refit(fam, w, c, cfg)                  (b) bank quantized (GPTQ, mean C), adapters refitted exactly to the
                                                 quantized bank under each expert's C, then GPTQ with H = M C M^T
    residual(w, base, cfg, h)                    (c) a low-rank part + GPTQ of the residual W - W_hat
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from benchmarks.baselines.common import by_layer
from globe.core.mixing import SparseCodes, compose, sparse_codes
from globe.core.result import FamilyFit
from globe.fit.solvers.quantized import exact_adapters_moments, quantize_bank
from globe.quant import QuantConfig, QuantizedTensor, quantize

BF16 = 2


@dataclass
class Compressed:
    """One family's reconstruction [L, E, p, d] (fp32) and its stored bytes, by part."""

    weights: torch.Tensor
    bytes: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def flat(t: torch.Tensor) -> torch.Tensor:
    """[L, E, ...] -> [L * E, ...]."""
    return t.reshape(-1, *t.shape[2:])


def quantized(w: torch.Tensor, cfg: QuantConfig, hessians: torch.Tensor | None = None) -> Compressed:
    """Plain weight-only quantization of every expert matrix (groups along d, the input)."""
    qt = quantize(flat(w), cfg, None if hessians is None else flat(hessians))
    return Compressed(qt.dequantize().view_as(w), {"codes+scales": qt.nbytes}, {"bits": cfg.bits, "group": cfg.group})


def code_bytes(fam: FamilyFit) -> dict[str, int]:
    nnz = int((fam.codes != 0).sum())
    return {"codes": nnz * (BF16 + 2), "scales": fam.scales.numel() * BF16}


def expert_order(fam: FamilyFit) -> torch.Tensor:
    """Row permutation of the family's experts into [L, E] order (the order of by_layer)."""
    ids = fam.ids
    return torch.argsort(ids[:, 0] * (int(ids[:, 1].max()) + 1) + ids[:, 1])


def mixed_atoms(fam: FamilyFit, bank: torch.Tensor) -> torch.Tensor:
    """tilde_B_i of every expert from `bank` [m, r, d] and the family's codes (bf16 values): [N, r, d] fp32."""
    idx, val = sparse_codes(fam.codes.float())
    return compose(SparseCodes(idx, val.to(torch.bfloat16).float()), bank.float(), fam.phi)


def globe_bf16(fam: FamilyFit) -> Compressed:
    bank, adapters = fam.bank.to(torch.bfloat16).float(), fam.adapters.to(torch.bfloat16).float()
    w = by_layer(adapters @ mixed_atoms(fam, bank), fam.ids)
    return Compressed(w, {"bank": bank.numel() * BF16, "adapters": adapters.numel() * BF16, **code_bytes(fam)},
                      dict(fam.shape))


def globe_after(fam: FamilyFit, cfg: QuantConfig) -> Compressed:
    """(a) bank [m, r, d] (groups along d) and adapters [N, p, r] (groups along r) quantized after the fit."""
    bank = quantize(fam.bank.float(), cfg)
    adapters = quantize(fam.adapters.float(), cfg)
    w = by_layer(adapters.dequantize() @ mixed_atoms(fam, bank.dequantize()), fam.ids)
    return Compressed(w, {"bank": bank.nbytes, "adapters": adapters.nbytes, **code_bytes(fam)}, dict(fam.shape))


def expert_moments(fam: FamilyFit, moments: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Each expert's input second moment C_i [N, d, d] fp64 (rows in the family's order), scaled to mean eigenvalue
    1 and damped by damp * I. moments: [L, E, d, d] in [L, E] order."""
    c = flat(moments).double()[torch.argsort(expert_order(fam))]
    c = c / c.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    return c + damp * torch.eye(c.shape[-1], dtype=c.dtype)


def globe_refit(fam: FamilyFit, weights: torch.Tensor, moments: torch.Tensor, cfg: QuantConfig) -> Compressed:
    """(b) bank quantized with GPTQ under the experts' mean C; adapters refitted to the quantized mixed atoms,
    A_i = W_i C_i M_i^T (M_i C_i M_i^T)^-1; then GPTQ of the adapters with H_i = M_i C_i M_i^T (their input is
    M_i x), so each adapter column's rounding error is fed back into the columns not yet quantized."""
    c = expert_moments(fam, moments)                                                   # [N, d, d]
    bank = quantize_bank(fam.bank.float(), replace(cfg, method="gptq"), c.mean(0))
    mixed = mixed_atoms(fam, bank.dequantize()).double()                               # [N, r, d]
    w = flat(weights).double()[torch.argsort(expert_order(fam))]                       # [N, p, d] family order
    adapters, gram = exact_adapters_moments(w, mixed, c)                               # [N, p, r], M C M^T
    qa = quantize(adapters.float(), replace(cfg, method="gptq"), gram.float())
    out = by_layer(qa.dequantize() @ mixed.float(), fam.ids)
    return Compressed(out, {"bank": bank.nbytes, "adapters": qa.nbytes, **code_bytes(fam)}, dict(fam.shape))


def residual(weights: torch.Tensor, base: Compressed, cfg: QuantConfig, hessians: torch.Tensor) -> Compressed:
    """(c) base (a low-rank reconstruction) + GPTQ of the residual W - base, under each expert's Hessian."""
    qt: QuantizedTensor = quantize(flat(weights - base.weights), cfg, flat(hessians))
    out = base.weights + qt.dequantize().view_as(weights)
    return Compressed(out, {**base.bytes, "residual": qt.nbytes}, {**base.info, "residual_bits": cfg.bits,
                                                                    "residual_group": cfg.group})
