"""Header-only fit planner (`globe fit --dry-run`): what a fit of a checkpoint will store, and how much memory and
time each phase will take on this device, before any tensor data is read.

    plan = plan_fit("path/to/model", FitConfig())       # reads config.json and the safetensors headers only
    print(plan.table()); plan.to_dict()                  # per family: params, bytes, GiB and seconds per phase

Shape: with bank.m and bank.r given, the plan is for that shape. Otherwise the budget solver chooses (m, r) from
the experts' spectra, which a dry run cannot see: the plan then covers every (m, r) the budget admits (and the
given one of m / r) and reports the candidate with the largest predicted peak memory, an upper bound, with the
range of r. The shape solver's own cost is exact (it depends only on the probed ranks). Times come from a
micro-benchmark of the dominant kernels at the planned shape on the fit's device (globe.fit.planning.timing).
Stored code non-zeros are data-dependent: planned as N x target_support (the controller's target median).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from globe.device import resolve_device
from globe.errors import ConfigError
from globe.core.params import dense_params, stored_params
from globe.fit.solvers.budget import candidate_shapes
from globe.fit.config import FitConfig
from globe.fit.constants import SPILL_FAMILY_BYTES
from globe.fit.planning.estimate import FitShape, gib, held_results, phase_bytes
from globe.fit.planning.timing import KernelRates, measure_rates, phase_seconds, varpro_evaluations

log = logging.getLogger(__name__)
PLAN_FORMAT_VERSION = 1


@dataclass
class FamilyPlan:
    """One family: its shape, stored params and artifact bytes, predicted peak bytes and seconds per phase."""

    family: str
    n: int
    p: int
    d: int
    m: int
    r: int
    shape_from: str                              # "config" | "budget upper bound (K candidates, r a..b)"
    params: dict[str, int]                       # as FamilyFit.param_count (codes_nnz planned)
    artifact_bytes: int                          # banks.safetensors share (fp32 tensors, CSR codes)
    memory: dict[str, int]                       # phase -> peak bytes, "peak"
    seconds: dict[str, float]                    # phase -> seconds, "total"
    held_bytes: int = 0                          # finished families' results held meanwhile
    varpro_evaluations: int = 0


@dataclass
class Plan:
    """The dry run of a fit: per family plans, the peak of the whole run, free resources and warnings."""

    model_dir: str
    device: str
    stored_dtype: str
    families: list[FamilyPlan]
    peak_bytes: int
    seconds: float
    free_memory_bytes: int | None
    free_disk_bytes: int | None
    rates: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    format_version: int = PLAN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Human-readable summary: one block per family, GiB and seconds per phase."""
        lines = [f"dry run of {self.model_dir} on {self.device} (experts stored as {self.stored_dtype})"]
        for f in self.families:
            total = f.params["stored"] / f.params["dense"]
            lines += [f"{f.family}: N={f.n} p={f.p} d={f.d} -> m={f.m} r={f.r} ({f.shape_from})",
                      f"  stored params {f.params['stored']:,} ({total:.3f} of dense {f.params['dense']:,}): "
                      f"bank {f.params['bank']:,}, adapters {f.params['adapters']:,}, codes ~{f.params['codes_nnz']:,}"
                      f", scales {f.params['scales']:,}; artifact {f.artifact_bytes / 2**30:.2f} GiB",
                      f"  {'phase':11} {'peak GiB':>9} {'time s':>10}"]
            for name, b in f.memory.items():
                if name != "peak" and (b or f.seconds.get(name)):
                    lines.append(f"  {name:11} {gib(b):9.2f} {f.seconds.get(name, 0.0):10.1f}")
            lines.append(f"  {'peak/total':11} {gib(f.memory['peak'] + f.held_bytes):9.2f} {f.seconds['total']:10.1f}"
                         + (f"   (incl. {gib(f.held_bytes)} GiB of earlier families' results)" if f.held_bytes else ""))
        free = "unknown" if self.free_memory_bytes is None else f"{gib(self.free_memory_bytes)} GiB"
        lines.append(f"whole fit: peak {gib(self.peak_bytes)} GiB (free now: {free}), "
                     f"~{self.seconds / 3600:.2f} h; kernel rates measured in {self.rates['benchmark_seconds']} s")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a fit on `device`: CUDA free memory, else MemAvailable of /proc/meminfo (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(out: str | os.PathLike[str] | None) -> int | None:
    """Free bytes on the filesystem that would hold `out` (its nearest existing parent)."""
    if out is None:
        return None
    path = Path(out).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def probe_ranks(n: int, p: int, d: int, cfg: FitConfig) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """(budget candidates the fit may choose, ranks the shape solver probes: globe.fit.engine.shape.probe_ranks)."""
    from globe.fit.engine.shape import probe_ranks as solver_ranks
    b = cfg.bank
    cands = candidate_shapes(n, p, d, b.budget, cfg.sparsity.target_support)
    if b.r is not None:
        cands = [(m, r) for m, r in cands if r == b.r] or cands
    if b.m is not None:
        cands = [(b.m, r) for _, r in cands]
    return cands, tuple(solver_ranks(n, p, d, cfg))


def family_params(n: int, p: int, d: int, m: int, r: int, support: int) -> dict[str, int]:
    """FamilyFit.param_count with codes_nnz planned as n * support."""
    nnz = n * min(support, m)
    return {"bank": m * r * d, "adapters": n * p * r, "codes_nnz": nnz, "scales": n,
            "stored": stored_params(n, p, d, m, r, nnz), "dense": dense_params(n, p, d)}


def artifact_bytes(params: dict[str, int], n: int) -> int:
    """banks.safetensors bytes of one family: fp32 bank, adapters, scales; int32 ids; CSR codes (int64 indptr,
    int32 indices, fp32 values)."""
    return 4 * (params["bank"] + params["adapters"] + n) + 8 * n + 8 * (n + 1) + 8 * params["codes_nnz"]


def plan_fit(model_dir: str | os.PathLike[str], cfg: FitConfig, out: str | os.PathLike[str] | None = None,
             rates: KernelRates | None = None, calibrate: bool = True) -> Plan:
    """Plan a fit of every configured family of model_dir from its headers (see the module docstring).
    rates: reuse measured KernelRates; calibrate=False with no rates skips the times (all 0)."""
    from globe.io import open_checkpoint
    cfg = cfg.validate()
    device = resolve_device(cfg.train.device)
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    n, p, d = len(inv.moe_layers) * inv.num_experts, inv.p, inv.d
    cfg.check_dims(n, p, d)
    shape, origin = _plan_shape(n, p, d, inv.dtype, cfg, device)
    if rates is None and calibrate:
        rates = measure_rates(shape, device)
    seconds = phase_seconds(shape, rates) if rates is not None else {"total": 0.0}
    memory = phase_bytes(shape)
    params = family_params(n, p, d, shape.m, shape.r, cfg.sparsity.target_support)
    families = []
    spilled = held_results(shape) >= SPILL_FAMILY_BYTES and len(cfg.bank.families) > 1   # see fit_model
    for k, family in enumerate(cfg.bank.families):
        pd_ = (d, p) if family == "down" else (p, d)
        fam_shape = shape if family != "down" else shape.with_(p=pd_[0], d=pd_[1])
        fam_params = params if family != "down" else family_params(n, *pd_, shape.m, shape.r, shape.support)
        families.append(FamilyPlan(
            family=family, n=n, p=pd_[0], d=pd_[1], m=shape.m, r=shape.r, shape_from=origin, params=fam_params,
            artifact_bytes=artifact_bytes(fam_params, n),
            memory=memory if family != "down" else phase_bytes(fam_shape),
            seconds=seconds if family != "down" or rates is None else phase_seconds(fam_shape, rates),
            held_bytes=0 if spilled else k * held_results(shape), varpro_evaluations=varpro_evaluations(shape)))
    peak = max(f.memory["peak"] + f.held_bytes for f in families)
    if spilled:                                          # every family read back from disk once all are fitted
        peak = max(peak, len(families) * held_results(shape))
    plan = Plan(model_dir=str(model_dir), device=str(device), stored_dtype=inv.dtype, families=families,
                peak_bytes=peak, seconds=round(sum(f.seconds["total"] for f in families), 1),
                free_memory_bytes=free_memory(device), free_disk_bytes=free_disk(out),
                rates=rates.to_dict() if rates is not None else {"benchmark_seconds": 0.0})
    plan.warnings = plan_warnings(plan)
    return plan


def _plan_shape(n: int, p: int, d: int, dtype: str, cfg: FitConfig, device) -> tuple[FitShape, str]:
    """The FitShape to plan: the configured (m, r), or the budget candidate with the largest predicted peak."""
    b = cfg.bank
    if b.m is not None and b.r is not None:
        return FitShape.from_config(cfg, n, p, d, b.m, b.r, dtype, device), "config"
    cands, probe = probe_ranks(n, p, d, cfg)
    if not cands:
        raise ConfigError(f"budget {b.budget:.3f} is too small for N={n}, p={p}, d={d} with support "
                          f"{cfg.sparsity.target_support}: raise --budget or lower --target-support")
    shapes = [FitShape.from_config(cfg, n, p, d, m, r, dtype, device, probe) for m, r in cands]
    worst = max(shapes, key=lambda s: phase_bytes(s)["peak"])
    rs = sorted({r for _, r in cands})
    return worst, (f"chosen on the data at fit time; planned: the largest peak of {len(cands)} budget "
                   f"candidates, r {rs[0]}..{rs[-1]}; pass --m and --r for an exact plan")


def plan_warnings(plan: Plan) -> list[str]:
    out = []
    if plan.free_memory_bytes is not None and plan.peak_bytes > plan.free_memory_bytes:
        out.append(f"predicted peak {gib(plan.peak_bytes)} GiB exceeds the {gib(plan.free_memory_bytes)} GiB free "
                   f"on {plan.device}: lower --r / --m, train.chunk_size, or use a larger machine")
    disk = sum(f.artifact_bytes for f in plan.families)
    if plan.free_disk_bytes is not None and disk > plan.free_disk_bytes:
        out.append(f"the artifact ({gib(disk)} GiB) exceeds the {gib(plan.free_disk_bytes)} GiB free on the output "
                   f"disk")
    return out
