"""The quantize stage: a fitted family's bank and adapters stored at cfg.quant.bits (globe.fit.solvers.quantized).

Runs last, on the gathered FamilyFit (original scale): the code values are rounded to the storage dtype of the
weights first (bf16 for a bf16 checkpoint, as the artifact stores them), the bank is quantized under the
objective's bank_hessian (the experts' mean C with calibration statistics, I without), the adapters are refitted
against the quantized bank under the objective's right factors R_i and quantized with GPTQ error feedback. The
FamilyFit then holds the dequantized bank and adapters (what the model computes with) and the packed parts in
`quant`; its metrics: rel_err after quantization, rel_err_unquantized, and `quant` (settings, bytes per part,
bits per routed weight). One process only (the stage needs every expert's weights).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from globe.core.result import FamilyFit
from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.solvers.metrics import error_metrics
from globe.fit.solvers.quantized import quantize_factors
from globe.quant import QuantConfig

log = logging.getLogger(__name__)

CODE_INDEX_BYTES = 4     # int32 atom index per stored code (globe.formats.artifact CSR)


def quantize_applies(cfg: FitConfig) -> bool:
    return cfg.quant.bits is not None


def quant_config(cfg: FitConfig) -> QuantConfig:
    q = cfg.quant
    return QuantConfig(method=q.method, bits=q.bits, group=q.group)


def stored_bytes(fam: FamilyFit, value_bytes: int) -> dict[str, int]:
    """Bytes of a family's stored parts as the artifact stores them: packed bank and adapters (or value_bytes per
    entry when unquantized; a rank per layer: only the real columns), code values + indices + row pointers, expert
    scales (fp32) and ids (2 x int32). The byte model before a fit: globe.fit.planning.bytes.family_bytes."""
    n = fam.codes.shape[0]
    nnz = int((fam.codes != 0).sum())
    params = fam.param_count()                             # adapters: each layer's real columns only
    part = {k: (fam.quant[k].nbytes if k in fam.quant else params[k] * value_bytes) for k in ("bank", "adapters")}
    return {**part, "codes": nnz * (value_bytes + CODE_INDEX_BYTES) + (n + 1) * 8, "scales": n * 4, "ids": n * 8}


def quantize_family(weights: torch.Tensor, fam: FamilyFit, cfg: FitConfig, objective=None,
                    world: int = 1) -> FamilyFit:
    """fam with quantized bank and adapters; weights [N, p, d] are the family's weights in fam's expert order."""
    if world > 1:
        raise ConfigError("quant.bits: quantizing the factors is not supported in a distributed fit yet")
    qcfg = quant_config(cfg)
    codes = fam.codes.float()
    if weights.dtype in (torch.bfloat16, torch.float16):
        codes = codes.to(weights.dtype).float()                      # the values the artifact will store
    right = None if objective is None or objective.plain_weights else objective.select
    hessian = None if objective is None else objective.bank_hessian()
    out = quantize_factors(weights, codes, fam.bank.float(), fam.phi, qcfg, right, hessian, cfg.train.chunk_size,
                           label=f"quantize {fam.family}")
    metrics = dict(fam.metrics)
    if "rel_err" in metrics:
        metrics["rel_err_unquantized"] = metrics["rel_err"]
    metrics.update(error_metrics(out.sq_err, out.sq_norms, fam.ids))
    if right is not None:
        metrics["act_rel_err_unquantized"] = metrics.get("act_rel_err")
        metrics["act_rel_err"] = float((out.weighted_sq_err.sum() / out.weighted_sq_norms.sum()).sqrt())
    result = dataclasses.replace(fam, codes=codes, bank=out.bank.dequantize(), adapters=out.adapters.dequantize(),
                                 quant={"bank": out.bank, "adapters": out.adapters}, metrics=metrics)
    value_bytes = min(torch.finfo(weights.dtype).bits // 8, 4) if weights.dtype.is_floating_point else 4
    parts = stored_bytes(result, value_bytes)
    dense = math.prod(weights.shape)
    metrics["quant"] = {**qcfg.to_dict(), "bytes": parts, "bytes_total": sum(parts.values()),
                        "bits_per_weight": round(8 * sum(parts.values()) / dense, 4)}
    log.info("%s quantized to %d bits (group %d, %s): rel_err %.4f -> %.4f, %.3f bits per routed weight",
             fam.family, qcfg.bits, qcfg.group, qcfg.method, metrics.get("rel_err_unquantized", float("nan")),
             metrics["rel_err"], metrics["quant"]["bits_per_weight"])
    return result
