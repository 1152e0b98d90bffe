"""Fit planner (`globe fit --dry-run`): what a fit of a checkpoint will store, and how much memory and time each
phase will take on this device, at the shape the fit will choose.

    plan = plan_fit("path/to/model", FitConfig())       # per family: params, bytes, GiB and seconds per phase
    print(plan.table()); plan.to_dict()

Shape: the fit's own choice (globe.fit.engine.shape.family_shape): the configured (m, r), the nonlinear block
start's rule, or, when m or r is left to the budget, the fit's budget solver run on the data, which means the dry
run READS the experts and runs the fit's normalise and shape stages (one SVD per expert; the plan says so in
shape_from). Phases: those fit_family runs for this config (fit_phases, from the engine's own predicates), by
the names the engine times (globe.fit.engine.phases); their costs are declared where they live: the solver
phases in globe.fit.planning.estimate / timing, each warm start in its module, the objective's stage and held
buffers by the objective (activation-aware fits included), the nonlinear stage in globe.fit.engine.nonlinear.
Times come from a micro-benchmark of the dominant kernels at the planned shape on the fit's device.
Stored code non-zeros are data-dependent: planned as N x target_support (the controller's target median).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from globe.device import resolve_device
from globe.core.params import dense_params, stored_params
from globe.fit.config import FitConfig
from globe.fit.constants import SPILL_FAMILY_BYTES
from globe.fit.costs import PHASE_COSTS
from globe.fit.engine.nonlinear import nonlinear_applies
from globe.fit.engine.quantize import quantize_applies
from globe.fit.engine.plain import plain_applies
from globe.fit.engine.shape import family_shape
from globe.fit.objectives.base import objective_class
from globe.fit.planning.estimate import FitShape, gib, held_results
from globe.fit.planning.timing import KernelRates, measure_rates
from globe.fit.solvers.varpro import varpro_evaluation_seconds, varpro_evaluations, varpro_memory

log = logging.getLogger(__name__)
PLAN_FORMAT_VERSION = 1
SOLVER_COSTS = SimpleNamespace(varpro_bytes=varpro_memory, varpro_evaluation_seconds=varpro_evaluation_seconds)


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
    artifact_bytes: int                          # banks.safetensors share (byte model: source dtype or packed)
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
                      f", scales {f.params['scales']:,}; artifact {f.artifact_bytes:,} bytes "
                      f"({f.artifact_bytes / 2**30:.2f} GiB)",
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


def family_params(n: int, p: int, d: int, m: int, r: int, support: int) -> dict[str, int]:
    """FamilyFit.param_count with codes_nnz planned as n * support."""
    nnz = n * min(support, m)
    return {"bank": m * r * d, "adapters": n * p * r, "codes_nnz": nnz, "scales": n,
            "stored": stored_params(n, p, d, m, r, nnz), "dense": dense_params(n, p, d)}


def artifact_bytes(params: dict[str, int], n: int) -> int:
    """banks.safetensors bytes of one family: fp32 bank, adapters, scales; int32 ids; CSR codes (int64 indptr,
    int32 indices, fp32 values)."""
    return 4 * (params["bank"] + params["adapters"] + n) + 8 * n + 8 * (n + 1) + 8 * params["codes_nnz"]


def planned_bytes(params: dict[str, int], n: int, p: int, d: int, m: int, r: int, dtype: str, cfg: FitConfig) -> int:
    """banks.safetensors share of one family by the byte model (globe.fit.planning.bytes): factors in the source
    dtype or packed at quant.bits, codes planned as params["codes_nnz"]."""
    from globe.fit.planning.bytes import family_bytes, value_bytes_of
    q = cfg.quant
    residual = None if q.residual_bits is None else (q.residual_bits, q.residual_group)
    return sum(family_bytes(n, p, d, m, r, params["codes_nnz"], value_bytes_of(dtype), q.bits, q.group,
                            residual=residual).values())


def plan_fit(model_dir: str | os.PathLike[str], cfg: FitConfig, out: str | os.PathLike[str] | None = None,
             rates: KernelRates | None = None, calibrate: bool = True) -> Plan:
    """Plan a fit of every configured family of model_dir (see the module docstring).
    rates: reuse measured KernelRates; calibrate=False with no rates skips the times (all 0)."""
    from globe.io import open_checkpoint
    cfg = cfg.validate()
    device = resolve_device(cfg.train.device)
    kind = objective_class(cfg)
    chosen = {}
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
        n, p, d = len(inv.moe_layers) * inv.num_experts, inv.p, inv.d
        cfg.check_dims(n, p, d)
        data = kind.load(cfg, inv)                          # e.g. the calibration statistics, as fit_model
        for family in cfg.bank.families:
            stack = reader.read_family(family, lazy=True)
            objective = kind.for_family(data, family, stack, cfg)
            chosen[family] = (family_shape(stack.weights, stack.ids, cfg, family, objective), objective)
            del stack
    families = []
    for family, (choice, objective) in chosen.items():
        pd_ = (d, p) if family == "down" else (p, d)
        shape = FitShape.from_config(cfg, n, *pd_, choice.m, choice.r, inv.dtype, device, choice.probe_ranks).with_(
            lean=objective.plain_weights, layers=len(inv.moe_layers))
        if rates is None and calibrate:
            rates = measure_rates(shape, device)
        memory, seconds = family_costs(shape, cfg, objective, choice.groups, rates)
        params = family_params(n, *pd_, choice.m, choice.r, cfg.sparsity.target_support)
        families.append(FamilyPlan(
            family=family, n=n, p=pd_[0], d=pd_[1], m=choice.m, r=choice.r, shape_from=choice.how, params=params,
            artifact_bytes=planned_bytes(params, n, *pd_, choice.m, choice.r, inv.dtype, cfg), memory=memory,
            seconds=seconds,
            varpro_evaluations=0 if choice.groups else varpro_evaluations(shape)))
    held = [held_results(_shape_of(f, cfg, inv.dtype, device)) for f in families]
    spilled = max(held) >= SPILL_FAMILY_BYTES and len(families) > 1           # see fit_model
    for k, f in enumerate(families):
        f.held_bytes = 0 if spilled else sum(held[:k])
    peak = max(f.memory["peak"] + f.held_bytes for f in families)
    if spilled:                                          # every family read back from disk once all are fitted
        peak = max(peak, sum(held))
    plan = Plan(model_dir=str(model_dir), device=str(device), stored_dtype=inv.dtype, families=families,
                peak_bytes=peak, seconds=round(sum(f.seconds["total"] for f in families), 1),
                free_memory_bytes=free_memory(device), free_disk_bytes=free_disk(out),
                rates=rates.to_dict() if rates is not None else {"benchmark_seconds": 0.0})
    plan.warnings = plan_warnings(plan)
    return plan


def _shape_of(f: FamilyPlan, cfg: FitConfig, dtype: str, device) -> FitShape:
    return FitShape.from_config(cfg, f.n, f.p, f.d, f.m, f.r, dtype, device)


def fit_phases(cfg: FitConfig, objective, groups: bool) -> list[str]:
    """The phases (globe.fit.engine.phases) fit_family runs for this config and objective, decided by the
    engine's own predicates."""
    if groups:
        return ["normalize", "nonlinear"]
    if plain_applies(cfg):
        return ["normalize", "quantize"]
    names = ["normalize", "shape", "warm_start", "am", "varpro"]
    names += [objective.stage_name] if objective.stage_name else []
    names += ["finalize"]
    names += ["nonlinear"] if nonlinear_applies(cfg, 1, objective) else []
    names += ["refine"] if cfg.train.refine_steps > 0 else []
    names += ["ranks"] if cfg.ranks.allocation != "uniform" else []
    names += ["quantize"] if quantize_applies(cfg) else []
    return names


def family_costs(s: FitShape, cfg: FitConfig, objective, groups: bool,
                 rates: KernelRates | None) -> tuple[dict[str, int], dict[str, float]]:
    """(peak bytes per phase + "peak", seconds per phase + "total") of the phases the fit runs, each as the phase
    declares it: globe.fit.costs.PHASE_COSTS (the solver and stage modules, the warm start's own part inside
    warm_start), the objective's own stage and held buffers (Objective.memory / seconds)."""
    runs = fit_phases(cfg, objective, groups)
    s = s.with_(nonlinear_start="groups" if groups else cfg.nonlinear.start)
    declared = {name: PHASE_COSTS[name] for name in runs if name in PHASE_COSTS}
    own = dict(objective.memory(s, SOLVER_COSTS))
    held = own.pop("held", 0)
    memory = {name: int(cost.memory(s)) for name, cost in declared.items()} | own
    memory = {name: int(memory.get(name, 0)) + held for name in runs}
    seconds: dict[str, float] = {}
    if rates is not None:
        seconds = {name: round(cost.seconds(s, rates), 2) for name, cost in declared.items()}
        seconds.update(objective.seconds(s, rates, SOLVER_COSTS))
        seconds = {name: round(seconds.get(name, 0.0), 2) for name in runs}
    return memory | {"peak": max(memory.values())}, seconds | {"total": round(sum(seconds.values()), 2)}


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
