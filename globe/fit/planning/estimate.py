"""Memory model of a fit: peak bytes of each phase of fit_family as pure functions of the problem's shape and the
fit config, read off what each phase allocates (no data, no torch work), plus `traced_peak`, the measured
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

from globe.fit.config import FitConfig
from globe.fit.solvers.linalg import low_precision
from globe.fit.solvers.varpro import lbfgs_history
from globe.fit.warm_starts.base import WARM_STARTS
from globe.fit.warm_starts.targets import LARGE_MATRIX, target_dtype

F4, F8 = 4, 8                       # bytes of fp32 / fp64


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

    @classmethod
    def from_config(cls, cfg: FitConfig, n: int, p: int, d: int, m: int, r: int, stored: str | torch.dtype,
                    device: str | torch.device = "cpu", probe_ranks: tuple[int, ...] = ()) -> "FitShape":
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
        t = cfg.train
        low = low_precision(t.precision, dtype, p, d, torch.device(device)) is not None
        return cls(n=n, p=p, d=d, r=r, m=m, chunk=t.chunk_size, stored_bytes=dtype.itemsize, low=low,
                   init=cfg.bank.init, mod=t.mod, am_iters=t.am_iters, varpro_steps=t.varpro_steps,
                   refine_steps=t.refine_steps, refine_batch=t.refine_batch, support=cfg.sparsity.target_support,
                   probe_ranks=tuple(probe_ranks), restarts=t.restarts, cycles=t.cycles)

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


def chunk_read(s: FitShape, c: int | None = None) -> int:
    """Normaliser.chunk: stored chunk -> fp32 -> divided: peak while the result is made (the result is 4 c p d)."""
    c = s.c if c is None else c
    cpd = c * s.p * s.d
    return cpd * (F4 + max(F4 if s.stored_bytes != F4 else 0, s.stored_bytes))


def refit_work(s: FitShape, c: int | None = None) -> int:
    """refit_adapters on a chunk, beyond its inputs w [c, p, d] and mixed [c, r, d]: W M^T (with bf16 copies of
    both operands), the Cholesky solve's column-major copy, the adapters, and the w.square() of the error."""
    c = s.c if c is None else c
    cpd, crd, cpr, crr = c * s.p * s.d, c * s.r * s.d, c * s.p * s.r, c * s.r * s.r
    cross = (2 * cpd + 2 * crd + 2 * cpr if s.low else 0) + F4 * cpr          # W M^T in bf16, then fp32
    solve = 2 * F4 * cpr + 3 * F4 * crr                                       # adapters + copy, Grams, factor
    return max(cross + 3 * F4 * crr, F4 * cpr + solve + F4 * cpd)             # ... then ||W||^2 term


def phase_normalize(s: FitShape) -> int:
    """Normalizer.fit: one chunk's fp64 copy and the square of that (the stored chunk comes from the reader's
    buffers, outside torch's allocator: not counted, as traced_peak does not see it)."""
    return s.c * s.p * s.d * 2 * F8


def svd_work(s: FitShape, rows: int, cols: int, c: int | None = None) -> int:
    """torch.linalg.svd(full_matrices=False) of c [rows, cols] fp32 matrices: column-major copy, U, S, Vh and the
    LAPACK gesdd workspace of one matrix (~ 4 k^2 + 4 max(rows, cols) floats, k = min)."""
    c = s.c if c is None else c
    k = min(rows, cols)
    return F4 * (c * rows * cols + c * (rows * k + k + k * cols) + 4 * k * k + 7 * k + 4 * max(rows, cols))


def phase_shape(s: FitShape) -> int:
    """pick_shape when the budget solver runs: expert_factors (one full SVD per expert, factors of the largest
    probed rank kept), then per probed rank the aligned targets and the Gram of their rows (fp64)."""
    if not s.probe_ranks:
        return 0
    rmax, k = max(s.probe_ranks), min(s.p, s.d)
    held = s.n * k * F4 + s.targets(rmax) + s.d * s.d * (F8 + F4)           # svals, factors, covariance
    cpd = s.c * s.p * s.d
    factor = F4 * cpd + max(chunk_read(s), svd_work(s, s.p, s.d), F4 * cpd + s.d * s.d * F4)   # chunk w + SVD
    probe = 0
    for r in s.probe_ranks:
        fp32 = target_dtype(s.n, r, s.d) == torch.float32
        gram = (2 * s.n * r * s.d * F8) if fp32 else 2 * 32 * r * s.d * F8   # x.to(fp64) twice, or row blocks
        probe = max(probe, s.targets(r) + gram + 2 * s.n * s.n * F8)
    return held + max(factor, probe + 2 * s.d * s.d * F8)


def _target_work(s: FitShape) -> int:
    """aligned_targets' chunk work beyond the targets: fp32 chunk, its top-r factors, the covariance."""
    cpd = s.c * s.p * s.d
    exact = s.p * s.d < LARGE_MATRIX or 4 * s.r > min(s.p, s.d)
    top = svd_work(s, s.p, s.d) if exact else F4 * s.c * (2 * s.p * (s.r + 16) + 2 * (s.r + 16) * s.d)
    return F4 * cpd + max(chunk_read(s) - F4 * cpd, top + F4 * s.c * s.r * s.d) + 2 * s.d * s.d * F8


def phase_warm_start(s: FitShape) -> int:
    """Aligned targets (from the solver's factors, which are still held, or from a fresh pass), then the init on
    the stacked targets x [N, r d]: fp32 targets get the in-memory inits (fp32 residual copies of `greedy` /
    `hybrid`, k-means' unit copy), bf16 targets the streamed ones: each warm start declares its own (WarmStartInit.memory)."""
    t, big = s.targets(), s.n * s.r * s.d * F4                                # T and one fp32 copy of it
    if s.probe_ranks and s.r <= max(s.probe_ranks):
        make = s.targets(max(s.probe_ranks)) + t + 3 * F4 * s.c * s.r * s.d
    else:
        make = t + _target_work(s)
    init = WARM_STARTS.get(s.init)().memory(s, streamed=t < big)              # the warm start's own cost
    return max(make, t + init + s.n * s.m * F4 * s.restarts)


def _am_chunk(s: FitShape) -> int:
    """One chunk of am_pass beyond the persistent buffers: w, mixed, the refit, A^T W, pinv targets, support Grams."""
    c = s.c
    cpd, crd, cpr = c * s.p * s.d, c * s.r * s.d, c * s.p * s.r
    group = min(c, max(1, 256 * 2**20 // (2 * s.slots * s.r * s.d * (2 if s.low else F4))))
    g_elems = group * s.slots * s.r * s.d
    support = g_elems * (12 if s.low else 8) + group * s.slots * s.r * s.r * (2 if s.low else F4)  # + G_i expanded
    refit = F4 * cpd + F4 * crd + refit_work(s)
    atw = F4 * cpd + F4 * cpr + (2 * cpr + 2 * cpd + 2 * crd if s.low else 0) + F4 * crd
    code = F4 * cpd + F4 * cpr + 3 * F4 * crd + support
    return max(chunk_read(s) + F4 * crd, refit, atw, code)


def phase_am(s: FitShape) -> int:
    """am_pass (the loop's largest moment) and the weighted MOD's conjugate gradients after it (the bf16 bank
    copy freed, the residual in the rhs), plus the settling error pass (chunk by chunk)."""
    from globe.fit.solvers.mod import apply_chunk
    if s.am_iters == 0:
        return 0
    bank, low = s.bank, s.bank // 2 if s.low else 0
    keep = bank * (2 if s.am_iters > 1 else 1) + s.n * s.m * F4 * 3           # state (+ best) bank, codes
    if s.mod == "weighted":
        persist = s.n * s.r * s.r * F4 + bank                                   # A_i^T A_i of every expert, rhs
        cc = min(apply_chunk(s.r, s.d), s.n)
        mod = persist + 4 * bank + bank + 2 * cc * s.r * s.d * F4               # x, z, dir, hd (res in rhs) + apply
    else:
        persist = bank + s.m * s.m * F8
        mod = persist + 2 * bank
    loop = low + persist + _am_chunk(s)
    settle = F4 * s.c * (s.p * s.d + s.r * s.d) + refit_work(s)              # errors only, no adapters kept
    return keep + max(loop, mod, settle)


def phase_varpro(s: FitShape) -> int:
    """Variable projection. torch.optim.LBFGS (small banks): parameters and gradients, 2 h fp32 history vectors,
    flat gradient, its previous copy, direction, line-search copies, plus one chunk of the closure with autograd
    (w, residual, its square, their gradients). Large banks (globe.fit.solvers.lean_varpro): x, g, d, bf16 pairs and the
    old gradient, plus a chunk without any [c, p, d] residual. Both: the AM state's bank and best bank."""
    from globe.fit.solvers.lean_varpro import PAIRS
    from globe.fit.solvers.varpro import uses_lean_varpro
    if s.varpro_steps == 0:
        return 0
    vec, bank = s.lbfgs_vector(), s.bank
    held = bank * (2 if s.am_iters else 1)
    cpd, crd, cpr = s.c * s.p * s.d, s.c * s.r * s.d, s.c * s.p * s.r
    if s.lean and uses_lean_varpro(s.m * s.r * s.d, s.n * s.m):
        pairs = min(PAIRS, max(s.varpro_steps - 1, 0))
        state = 3 * vec + pairs * vec + vec // 2
        chunk = F4 * cpd + F4 * crd + max(refit_work(s), 3 * F4 * crd + F4 * cpr)   # w, M; A^T W, A^T A M
        return held + state + max(chunk, 3 * vec // 2)
    pairs = min(s.lbfgs_history(), max(s.varpro_steps - 1, 0))              # history fills one pair per iteration
    state = (2 * pairs + 5) * vec + 2 * bank
    closure = 2 * F4 * cpd + 2 * F4 * crd + F4 * cpr + max(refit_work(s), 2 * F4 * cpd + bank)   # w, residual
    return held - bank + bank + state + closure


def phase_refine(s: FitShape) -> int:
    """Adam refinement: fitted adapters kept, a clone as parameter, its gradient and two moments; a minibatch."""
    if s.refine_steps == 0:
        return 0
    b = min(s.refine_batch, s.n)
    params = 5 * (s.adapters + s.bank)                                       # fitted, param, grad, exp_avg, _sq
    batch = F4 * b * (4 * s.p * s.d + 2 * s.r * s.d + s.p * s.r)
    return params + batch + s.adapters + s.bank                               # + the refined fit's adapters


def phase_finalize(s: FitShape) -> int:
    """finalize (exact adapters, chunk by chunk), folded in place, and the bank metrics: the bank in fp64 with its
    SVD copy / unit rows, or for large banks the m x m Gram accumulated over column blocks."""
    from globe.fit.solvers.metrics import GRAM_METRICS_BYTES
    chunk = F4 * s.c * (s.p * s.d + s.r * s.d) + refit_work(s)
    big = s.m * s.r * s.d * F8 > GRAM_METRICS_BYTES
    metrics = 2 * s.m * 2**16 * F8 + 3 * s.m * s.m * F8 if big else 2 * 2 * s.bank + 2 * s.m * s.m * F8
    return s.bank + s.adapters + max(chunk, metrics)


PHASES = {"normalize": phase_normalize, "shape": phase_shape, "warm_start": phase_warm_start, "am": phase_am,
          "varpro": phase_varpro, "refine": phase_refine, "finalize": phase_finalize}


def phase_bytes(s: FitShape) -> dict[str, int]:
    """Predicted peak bytes of each phase of fit_family (0 for phases that do not run) and their maximum."""
    out = {name: int(fn(s)) for name, fn in PHASES.items()}
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
