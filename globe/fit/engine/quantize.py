"""The quantize stage: a fitted family's bank and adapters stored at cfg.quant.bits (globe.fit.solvers.quantized).

Runs last, on the gathered FamilyFit (original scale): the code values are rounded to the storage dtype of the
weights first (bf16 for a bf16 checkpoint, as the artifact stores them), the bank is quantized under the
objective's bank_hessian (the experts' mean C with calibration statistics, I without), the adapters are refitted
against the quantized bank under the objective's right factors R_i and quantized with GPTQ error feedback. The
FamilyFit then holds the dequantized bank and adapters (what the model computes with) and the packed parts in
`quant`; its metrics: rel_err after quantization, rel_err_unquantized, and `quant` (settings, bytes per part,
bits per routed weight). One process only (the stage needs every expert's weights).
With cfg.quant.residual_bits the stage then stores each expert's residual W_i - W_hat_i quantized
(globe.fit.solvers.residual: GPTQ under the expert's routed Hessian with statistics, RTN without) in
quant["residual"]; rel_err is then that of W_hat_i + dequant(R_i), rel_err_factors the factors' alone.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from globe.core.result import FamilyFit
from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.engine.duplicates import tie_duplicates, tie_quantized
from globe.fit.costs import declare_cost
from globe.fit.solvers.metrics import error_metrics
from globe.fit.solvers.quantized import quantize_factors
from globe.fit.solvers.residual import RESIDUAL_CHUNK, quantize_residual, residual_method
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
    scales (fp32) and ids (2 x int32); a family with no base (rank 0) only its residuals, as the compressed
    checkpoint stores it. The byte model before a fit: globe.fit.planning.bytes.family_bytes."""
    n = fam.codes.shape[0]
    nnz = int((fam.codes != 0).sum())
    params = fam.param_count()                             # adapters: each layer's real columns only
    part = {k: (fam.quant[k].nbytes if k in fam.quant else params[k] * value_bytes) for k in ("bank", "adapters")}
    out = {**part, "codes": nnz * (value_bytes + CODE_INDEX_BYTES) + (n + 1) * 8, "scales": n * 4, "ids": n * 8}
    if fam.bank.shape[1] == 0:               # no base (plain): the compressed checkpoint stores no code (k = 0),
        out.update(codes=0, scales=0, ids=0)  # no scale, no id (family_bytes)
    if "residual" in fam.quant:
        out["residual"] = fam.quant["residual"].nbytes
    return out


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
    copies = {c: f for c, f in fam.metrics.get("duplicates") or []}    # found by the gather stage; each copy's
    if copies:                                                          # refit saw its own inputs: tie them again
        out.adapters = tie_quantized(copies, out.adapters)
        tie_duplicates(copies, out.sq_err)                  # exact: same weights, same reconstruction (the weighted
                                                            # errors stay those of each copy's own refit: a report)
    metrics = dict(fam.metrics)
    if "rel_err" in metrics:
        metrics["rel_err_unquantized"] = metrics["rel_err"]
    metrics.update(error_metrics(out.sq_err, out.sq_norms, fam.ids))
    if right is not None:
        metrics["act_rel_err_unquantized"] = metrics.get("act_rel_err")
        metrics["act_rel_err"] = float((out.weighted_sq_err.sum() / out.weighted_sq_norms.sum()).sqrt())
    result = dataclasses.replace(fam, codes=codes, bank=out.bank.dequantize(), adapters=out.adapters.dequantize(),
                                 quant={"bank": out.bank, "adapters": out.adapters}, metrics=metrics)
    if cfg.quant.residual_bits is not None:
        hessians = None if right is None else objective.expert_hessians
        result = add_residual(weights, result, cfg, right, copies, out.sq_norms, out.weighted_sq_norms, hessians)
        metrics = result.metrics
    value_bytes = min(torch.finfo(weights.dtype).bits // 8, 4) if weights.dtype.is_floating_point else 4
    parts = stored_bytes(result, value_bytes)
    dense = math.prod(weights.shape)
    settings = qcfg.to_dict()
    if "residual" in result.quant:
        settings["residual"] = {"bits": cfg.quant.residual_bits, "group": cfg.quant.residual_group,
                                "method": residual_method(right)}
    metrics["quant"] = {**settings, "bytes": parts, "bytes_total": sum(parts.values()),
                        "bits_per_weight": round(8 * sum(parts.values()) / dense, 4)}
    log.info("%s quantized to %d bits (group %d, %s): rel_err %.4f -> %.4f, %.3f bits per routed weight",
             fam.family, qcfg.bits, qcfg.group, qcfg.method, metrics.get("rel_err_unquantized", float("nan")),
             metrics["rel_err"], metrics["quant"]["bits_per_weight"])
    return result


def add_residual(weights: torch.Tensor, fam: FamilyFit, cfg: FitConfig, right, copies: dict[int, int],
                 sq_norms: torch.Tensor, weighted_sq_norms: torch.Tensor, hessians=None) -> FamilyFit:
    """fam with each expert's residual W_i - W_hat_i quantized in quant["residual"] and its errors updated;
    sq_norms / weighted_sq_norms [N]: ||W_i||^2 and ||W_i R_i||^2; hessians: the objective's expert_hessians (GPTQ's
    Hessians: its undamped second moments) or None (R_i R_i^T)."""
    rcfg = QuantConfig(bits=cfg.quant.residual_bits, group=cfg.quant.residual_group)
    out = quantize_residual(weights, fam, rcfg, right, label=f"residual {fam.family}", hessians=hessians)
    residual = tie_quantized(copies, out.residual) if copies else out.residual
    if copies:
        tie_duplicates(copies, out.sq_err)
    metrics = dict(fam.metrics)
    metrics["rel_err_factors"] = metrics.get("rel_err")
    metrics.update(error_metrics(out.sq_err, sq_norms, fam.ids))
    if right is not None:
        metrics["act_rel_err_factors"] = metrics.get("act_rel_err")
        metrics["act_rel_err"] = float((out.weighted_sq_err.sum() / weighted_sq_norms.sum()).sqrt())
    log.info("%s residual at %d bits (group %d, %s): rel_err %.4f -> %.4f", fam.family, rcfg.bits, rcfg.group,
             residual_method(right), metrics["rel_err_factors"], metrics["rel_err"])
    return dataclasses.replace(fam, quant={**fam.quant, "residual": residual}, metrics=metrics)


# ---- the declared cost of the quantize phase (globe.fit.costs; s: globe.fit.planning.estimate.FitShape) ----
# GPTQ's column loop (globe.quant.gptq) is many small strided fp64 operations: per row and column it costs about
# GPTQ_ROWCOL_BYTES plus GPTQ_ENTRY_BYTES per entry of the rest of its block at the fp64 elementwise rate
# (KernelRates.stream64), and GPTQ_COLUMN_SECONDS per column and batch (dispatch). Calibrated on the embedded model's
# shapes (N=96, p=128, d=256; r 32..120) on one CPU thread: 0.28-1.07 us per row and column.
GPTQ_ROWCOL_BYTES = 6800
GPTQ_ENTRY_BYTES = 190
GPTQ_COLUMN_SECONDS = 2e-5
QUANT_STREAM_BYTES = 160          # fp64 copies, differences and squares: bytes moved per weight entry
QUANT_PACK_BYTES = 64             # packing and dequantizing: bytes moved per adapter entry
OUT_OF_CACHE = 10                 # whole chunks in fp64 run ~10x below the cache-hot rates that measure_rates sees


def gptq_seconds(rows: int, cols: int, group: int, q, calls: int = 1) -> float:
    """GPTQ (globe.quant.gptq) of [rows, cols] in `calls` batches: the column loop over blocks of 128 columns."""
    block = -(-max(128, group) // group) * group
    inner = min(block, cols) / 2
    per_entry = (GPTQ_ROWCOL_BYTES + GPTQ_ENTRY_BYTES * inner) / q.stream64
    return rows * cols * per_entry + calls * cols * GPTQ_COLUMN_SECONDS


def quantize_memory(s) -> int:
    """Peak bytes of the quantize phase: the gathered FamilyFit it starts from (fp32 bank, adapters, codes) and its
    fp32 code copy, the dequantized bank in fp64, then the larger of one chunk's work (weights, mixed atoms, their
    product and difference in fp64; the exact adapters, GPTQ's copies and the dequantized adapters) and the final
    dequantization of the packed adapters (int64 unpacking, fp32 grouped values)."""
    if s.quant_bits is None:
        return 0
    c, n, p, d, r, m = s.c, s.n, s.p, s.d, s.r, s.m
    held = s.bank + s.adapters + 2 * n * m * 4 + 8 * m * r * d
    groups = -(-r // s.quant_group)
    stored = n * p * r + 2 * 2 * n * p * groups                            # uint8 codes, fp16 scales + zeros
    inputs = 8 * c * (p * d + r * d) * (1 if s.lean else 2)               # W, M (and W R_i, M_i R_i) in fp64
    gptq = 8 * c * p * r * 6 + 8 * c * r * r * 4                          # refit, GPTQ's copies, U, H
    errors = 8 * c * p * d * 2 + 8 * c * p * r * 2                        # W - A M and its square; A
    bank = 8 * m * r * d * 4 + 8 * d * d * 4                              # the bank's GPTQ (before the chunks)
    final = (8 + 8 + 4 + 4) * n * p * r + s.adapters
    peak = held + stored + max(inputs + max(gptq, errors), bank, final)
    if getattr(s, "residual_bits", None) is None:
        return peak
    c = min(RESIDUAL_CHUNK, n)                            # the residual stage: packed residuals + one GPTQ batch
    residual = n * p * d + 2 * 2 * n * p * -(-d // s.residual_group) + 8 * c * (3 * p * d + 3 * d * d)
    return max(peak, held + stored + residual)


def quantize_seconds(s, q) -> float:
    """The bank's GPTQ (m r rows, d columns), then per expert in fp64: the mixed atoms, the exact adapter refit
    (W M^T, M M^T), the adapters' GPTQ (p rows, r columns, one batch per chunk), the error terms (A M twice, the
    squares); then packing and dequantizing the adapters."""
    if s.quant_bits is None:
        return 0.0
    n, p, d, r, m = s.n, s.p, s.d, s.r, s.m
    rowcol = (GPTQ_ROWCOL_BYTES + GPTQ_ENTRY_BYTES) / q.stream64
    bank = gptq_seconds(m * r, d, s.quant_group, q) if s.quant_method == "gptq" else m * r * d * rowcol
    adapters = gptq_seconds(n * p, r, s.quant_group, q, -(-n // s.c)) if s.quant_method == "gptq" \
        else n * p * r * rowcol
    f64, s64 = (q.wd64 or q.wd32 / 2) / OUT_OF_CACHE, q.stream64 / OUT_OF_CACHE
    products = n * (6 * p * d * r + 2 * r * r * d) / f64 + n * 2 * m * r * d / q.bank
    stream = n * p * d * QUANT_STREAM_BYTES / s64 + n * p * r * QUANT_PACK_BYTES / s64
    residual = 0.0
    if getattr(s, "residual_bits", None) is not None:     # GPTQ of every expert's [p, d] residual, one batch a chunk
        residual = gptq_seconds(n * p, d, s.residual_group, q, -(-n // RESIDUAL_CHUNK)) + n * p * d * r * 2 / f64
    return bank + adapters + products + stream + residual


declare_cost("quantize", quantize_memory, quantize_seconds)
