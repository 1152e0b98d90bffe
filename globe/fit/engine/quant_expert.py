"""The quantized expert phase: what stays floating point after the quantize stage, trained on the whole expert's output.

    families, info = quant_expert_stage({"gate": g, "up": u}, weights, samples, cfg.expert, seed, torch.bfloat16)

Runs after the quantize stage (globe.fit.engine.quantize) on the quantized gate and up: the integer codes of the
bank and the adapters are fixed (bit for bit), and what is trained is what the artifact stores in floating point:
the fp16 group scales and zero points of the bank [m, r, G] and of the adapters [N, p, G], and the nonzero code
values (the sparsity pattern fixed, as in the expert phase). A weight of group g dequantizes to (q - z_g) s_g, so
a trained scale stretches its group and a trained zero shifts it. The objective, the routed samples, the step
rule (Adam, each factor's step cfg.quant_lr x its RMS, cosine decay), the seeded minibatches and the held-out
selection of the best state are those of the expert phase (globe.fit.engine.expert.train_output, cfg.quant_steps
steps); the held-out error is measured on the values as stored (scales and zeros in fp16, code values in the
weights' dtype), so a kept state is exactly what the artifact computes, and when no step beats the quantized fit
the fit is kept as it is. The result is stored in the existing format: the same packed codes, new fp16 scales and
zeros, new code values. Not with residuals (quant.residual_bits: they were fitted to the factors before) nor with a
rank per layer (not quantized).
"""
from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from globe.calibration.routed import RoutedSamples
from globe.core.mixing import compose
from globe.core.result import FamilyFit
from globe.errors import ConfigError
from globe.fit.engine.duplicates import tie_duplicates, tie_quantized
from globe.fit.engine.expert import FAMILIES, keep_codes, output_data, rms_groups, train_output
from globe.fit.expert_config import ExpertConfig
from globe.quant.tensor import SCALE_DTYPE, QuantizedTensor, grouped, ungrouped

log = logging.getLogger(__name__)

PARTS = ("bank", "adapters")
FLOATS = ("scales", "zeros")


class _QuantParams:
    """The float parts of both quantized families (fp32 leaves) around their fixed integer codes."""

    def __init__(self, families: dict[str, FamilyFit], value_dtype: torch.dtype) -> None:
        self.phi = {f: families[f].phi for f in FAMILIES}
        self.value_dtype = value_dtype
        self.ints = {(f, part): grouped(families[f].quant[part].integer_codes().float(), families[f].quant[part].group)
                     for f in FAMILIES for part in PARTS}                  # [..., rows, G, group] fixed
        self.cols = {(f, part): families[f].quant[part].shape[-1] for f in FAMILIES for part in PARTS}
        tensors = {(f, "codes"): families[f].codes.detach().float().clone() for f in FAMILIES}
        tensors.update({(f, part, k): getattr(families[f].quant[part], k).float().clone()
                        for f in FAMILIES for part in PARTS for k in FLOATS})
        self.tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
        self.code_mask = {f: families[f].codes != 0 for f in FAMILIES}                        # [N, m]
        self.nonneg = {f: bool((families[f].codes >= 0).all()) for f in FAMILIES}
        self.rounded = False

    def _part(self, family: str, part: str, index: slice = slice(None)) -> torch.Tensor:
        t = self.tensors
        s, z = t[family, part, "scales"][index], t[family, part, "zeros"][index]
        if self.rounded:
            s, z = s.to(SCALE_DTYPE).float(), z.to(SCALE_DTYPE).float()
        w = (self.ints[family, part][index] - z[..., None]) * s[..., None]
        return ungrouped(w, self.cols[family, part])

    def weights(self, family: str, lo: int, hi: int) -> torch.Tensor:
        """W_hat_i = A_i phi(sum_j alpha_ij B_j) with A, B dequantized from the current scales and zeros:
        [hi - lo, p, d]."""
        codes = self.tensors[family, "codes"][lo:hi]
        if self.rounded:
            codes = codes.to(self.value_dtype).float()
        bank = self._part(family, "bank")                                                   # [m, r, d]
        return self._part(family, "adapters", slice(lo, hi)) @ compose(codes, bank, self.phi[family])

    def groups(self, lr: float) -> list[dict]:
        return rms_groups(self.tensors.values(), lr)

    def mask_grads(self) -> None:
        for f in FAMILIES:
            codes = self.tensors[f, "codes"]
            if codes.grad is not None:
                codes.grad.mul_(self.code_mask[f])

    @torch.no_grad()
    def project(self) -> None:
        """Kept codes stay nonzero (and non-negative for a non-negative fit), scales stay positive."""
        for f in FAMILIES:
            keep_codes(self.tensors[f, "codes"], self.code_mask[f], self.nonneg[f])
            for part in PARTS:
                s = self.tensors[f, part, "scales"]
                s.copy_(torch.where(s > 0, s, torch.full_like(s, 1e-7)))   # a scale trained through 0 flips a group

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def evaluated(self) -> _QuantParams:
        """The same tensors read as stored (fp16 scales and zeros, code values in the weights' dtype)."""
        out = copy.copy(self)
        out.rounded = True
        return out


def _family(fam: FamilyFit, state: dict, family: str, info: dict, value_dtype: torch.dtype) -> FamilyFit:
    copies = {c: f for c, f in fam.metrics.get("duplicates") or []}       # each copy trained on its own tokens:
    codes = state[family, "codes"].to(value_dtype).float().clone()        # the first occurrence's parts again
    tie_duplicates(copies, codes)
    quant = dict(fam.quant)
    for part in PARTS:
        old = fam.quant[part]
        scales, zeros = (state[family, part, k].to(SCALE_DTYPE).contiguous() for k in FLOATS)
        new = QuantizedTensor(old.codes, scales, zeros, old.shape, old.bits, old.group)   # the same packed codes
        quant[part] = tie_quantized(copies, new) if part == "adapters" and copies else new
    return dataclasses.replace(fam, codes=codes.to(fam.codes.dtype), bank=quant["bank"].dequantize(),
                               adapters=quant["adapters"].dequantize(), quant=quant,
                               metrics={**fam.metrics, "quant_expert": info},
                               history={**fam.history, "quant_expert": info["validation_history"]})


def quant_expert_stage(families: dict[str, FamilyFit], weights: dict[str, torch.Tensor], samples: RoutedSamples,
                       cfg: ExpertConfig, seed: int = 0, value_dtype: torch.dtype = torch.float32,
                       gains: torch.Tensor | None = None) -> tuple[dict[str, FamilyFit], dict]:
    """(families with the float parts of quantized gate and up trained, what happened); see the module docstring.
    weights: the original gate, up [N, p, d] and down [N, h, p] in the families' expert order; value_dtype: the
    dtype the artifact stores code values in (the checkpoint's)."""
    cfg.check()
    for f in FAMILIES:
        fam = families[f]
        if not {"bank", "adapters"} <= set(fam.quant):
            raise ConfigError(f"the quantized expert phase needs quantized factors ({f} is not quantized)")
        if "residual" in fam.quant:
            raise ConfigError("the quantized expert phase does not run with --residual-bits")
        if fam.ranks is not None and len(set(fam.ranks)) > 1:
            raise ConfigError("the quantized expert phase does not run with a rank per layer")
    data = output_data(families, weights, samples, cfg.validation, gains)     # gains: the expert phase's
    schedule = dataclasses.replace(cfg, steps=cfg.quant_steps, lr=cfg.quant_lr)
    info, best_state = train_output(_QuantParams(families, value_dtype), data, schedule, seed, "quantized expert phase")
    if best_state is None:
        return {f: dataclasses.replace(fam, metrics={**fam.metrics, "quant_expert": info})
                for f, fam in families.items()}, info
    out = dict(families)
    for f in FAMILIES:
        out[f] = _family(families[f], best_state, f, info, value_dtype)
    return out, info
