"""Memory model of a fit: `FitShape` (what the cost models read: the problem's shape and the fit config) and
`phase_bytes`, the peak bytes each phase of fit_family declares (globe.fit.costs: pure functions of the shape,
read off what the phase allocates, next to the code that runs it), plus `traced_peak`, the measured
counterpart (exact live bytes of torch's CPU allocator, from the profiler's memory events).

    shape = FitShape.from_config(cfg, n=1440, p=1408, d=2048, m=256, r=704, stored="bfloat16", device="cpu")
    phase_bytes(shape)      # {"normalize": .., "shape": .., "warm_start": .., "am": .., "varpro": .., ...}

Notation in the comments: c = experts per chunk, B = one fp32 bank (m r d floats), V = one fp32 L-BFGS vector
(bank + logits + gains), T = the aligned targets [N, r, d] in their storage dtype, A = all fp32 adapters [N, p, r].
Only buffers that scale with the problem are counted; the torch runtime itself (~0.3 GiB of RSS) is not.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import torch

import globe.fit.engine.quantize  # noqa: F401  (declares the quantize phase's cost)
import globe.fit.engine.ranks  # noqa: F401  (ranks)
import globe.fit.solvers.adam  # noqa: F401  (declares the refine phase's cost)
import globe.fit.solvers.adapters  # noqa: F401  (finalize)
import globe.fit.solvers.am  # noqa: F401  (am)
import globe.fit.solvers.normalize  # noqa: F401  (normalize)
import globe.fit.warm_starts.costs  # noqa: F401  (shape, warm_start)
from globe.fit.config import FitConfig
from globe.fit.costs import F4, PHASE_COSTS
from globe.fit.solvers.linalg import low_precision
from globe.fit.solvers.varpro import lbfgs_history
from globe.fit.warm_starts.targets import target_dtype


@dataclass(frozen=True)
class FitShape:
    """Everything the memory and time models need about one family's fit."""

    n: int                          # experts of the family (all layers)
    p: int                          # rows of an expert
    d: int                          # columns of an expert (hidden size)
    r: int                          # adapter rank
    m: int                          # atoms
    chunk: int = 64                 # train.chunk_size
    stored_bytes: int = 2           # bytes per stored weight (bf16: 2)
    low: bool = False               # rounding-tolerant products in bf16 (train.precision)
    init: str = "hybrid"
    mod: str = "weighted"
    am_iters: int = 30
    varpro_steps: int = 100
    refine_steps: int = 0
    refine_batch: int = 32
    support: int = 12
    probe_ranks: tuple[int, ...] = ()   # ranks the shape solver probes (empty: m and r were given)
    restarts: int = 1
    cycles: int = 1
    lean: bool = True               # the objective lets large banks use the lean variable projection
    layers: int = 1                 # MoE layers the n experts come from
    nonlinear_start: str = "am"     # nonlinear.start ("groups": the groups fit replaces shape .. finalize)
    nonlinear_steps: int = 0        # nonlinear.steps
    rank_step: int = -1             # ranks.step of a sensitivity allocation (-1: uniform ranks, no rank stage)
    quant_bits: int | None = None   # quant.bits (None: no quantize stage)
    quant_group: int = 64           # quant.group
    quant_method: str = "gptq"      # quant.method
    residual_bits: int | None = None   # quant.residual_bits (None: no residuals)
    residual_group: int = 128       # quant.residual_group

    @classmethod
    def from_config(cls, cfg: FitConfig, n: int, p: int, d: int, m: int, r: int, stored: str | torch.dtype,
                    device: str | torch.device = "cpu", probe_ranks: tuple[int, ...] = ()) -> "FitShape":
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
        t = cfg.train
        low = low_precision(t.precision, dtype, p, d, torch.device(device)) is not None
        return cls(n=n, p=p, d=d, r=r, m=m, chunk=t.chunk_size, stored_bytes=dtype.itemsize, low=low,
                   init=cfg.bank.init, mod=t.mod, am_iters=t.am_iters, varpro_steps=t.varpro_steps,
                   refine_steps=t.refine_steps, refine_batch=t.refine_batch, support=cfg.sparsity.target_support,
                   probe_ranks=tuple(probe_ranks), restarts=t.restarts, cycles=t.cycles,
                   nonlinear_start=cfg.nonlinear.start, nonlinear_steps=cfg.nonlinear.steps,
                   rank_step=-1 if cfg.ranks.allocation == "uniform" else cfg.ranks.step,
                   quant_bits=cfg.quant.bits, quant_group=cfg.quant.group, quant_method=cfg.quant.method,
                   residual_bits=cfg.quant.residual_bits, residual_group=cfg.quant.residual_group)

    def with_(self, **changes) -> "FitShape":
        return dataclasses.replace(self, **changes)

    # ---- sizes used by several phases ----
    @property
    def c(self) -> int:
        return min(self.chunk, self.n)

    @property
    def bank(self) -> int:                       # B
        return self.m * self.r * self.d * F4

    @property
    def adapters(self) -> int:                   # A
        return self.n * self.p * self.r * F4

    @property
    def slots(self) -> int:                      # support slots of the weighted coder
        return min(4 * self.support + 4, self.m)

    def targets(self, r: int | None = None) -> int:    # T
        r = self.r if r is None else r
        return self.n * r * self.d * target_dtype(self.n, r, self.d).itemsize

    def lbfgs_vector(self) -> int:               # V: bank + logits + gains, fp32
        return (self.m * self.r * self.d + self.n * self.m + self.n) * F4

    def lbfgs_history(self) -> int:
        return lbfgs_history(self.m * self.r * self.d + self.n * self.m)














# The phases whose cost every fit plans (the objective's stage and the nonlinear one are added by plan.family_costs)
SOLVER_PHASES = ("normalize", "shape", "warm_start", "am", "varpro", "refine", "finalize")


def phase_bytes(s: FitShape) -> dict[str, int]:
    """Predicted peak bytes of each phase of fit_family (0 for phases that do not run) and their maximum, as
    each phase declares it (globe.fit.costs)."""
    out = {name: int(PHASE_COSTS[name].memory(s)) for name in SOLVER_PHASES}
    return out | {"peak": max(out.values())}


def held_results(s: FitShape) -> int:
    """What a finished family's FamilyFit keeps while fit_model fits the next one (fp32 adapters, bank, codes)."""
    return s.adapters + s.bank + s.n * s.m * F4


def gib(x: float) -> float:
    return round(x / 2**30, 2)


def traced_peak(fn, *args, **kwargs) -> tuple[object, int, dict[str, int]]:
    """(fn(*args, **kwargs), peak bytes of torch's CPU allocations live during the call above those live at its
    start, the same peak within each torch.profiler.record_function range by name), from the profiler's
    allocation events: exact and independent of the allocator's caching and of the runtime's RSS. Memory that
    LAPACK / BLAS allocate themselves is not seen."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn(*args, **kwargs)
    events = prof.profiler.kineto_results.events()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    ranges = [(e.name(), e.start_ns(), e.end_ns()) for e in events if e.is_user_annotation()]
    times, levels, live = [], [], 0
    for t, nbytes in allocs:
        live += nbytes
        times.append(t)
        levels.append(live)
    by_name: dict[str, int] = {}
    for name, lo, hi in ranges:
        i, j = bisect.bisect_left(times, lo), bisect.bisect_right(times, hi)
        before = levels[i - 1] if i > 0 else 0
        by_name[name] = max(by_name.get(name, 0), max(levels[i:j], default=before), before)
    return value, max(levels, default=0), by_name
