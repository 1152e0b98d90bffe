"""Each phase of a fit declares its own cost here, by name, from the module that runs it: peak bytes
`memory(shape)` and seconds `seconds(shape, rates)`, pure functions of the problem's shape (a
globe.fit.planning.estimate.FitShape) and, for time, of the device's kernel rates (globe.fit.planning.timing.
KernelRates). The dry run (globe.fit.planning) only sums what the phases the fit runs declare.

    declare_cost("am", memory=am_memory, seconds=am_seconds)      # in globe.fit.solvers.am

Declared by: normalize (solvers.normalize), shape and warm_start (warm_starts.costs), am (solvers.am), varpro
(solvers.varpro), finalize (solvers.adapters), refine (solvers.adam), nonlinear (engine.nonlinear), ranks
(engine.ranks), quantize (engine.quantize, with GPTQ's calibrated column-loop constants); an objective's
own stage by the objective (objectives.base.Objective.memory / seconds). Also the terms several phases share:
reading a chunk, the exact adapter refit, an SVD.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

F4, F8 = 4, 8                       # bytes of fp32 / fp64


@dataclass(frozen=True)
class PhaseCost:
    """A phase's declared cost: peak bytes and seconds (0 where the configured fit skips the phase)."""

    memory: Callable[..., int]              # (shape) -> bytes
    seconds: Callable[..., float]           # (shape, rates) -> seconds


PHASE_COSTS: dict[str, PhaseCost] = {}


def declare_cost(name: str, memory: Callable[..., int], seconds: Callable[..., float]) -> None:
    """Register phase `name`'s cost (its name as in globe.fit.engine.phases)."""
    PHASE_COSTS[name] = PhaseCost(memory, seconds)


# ---- memory terms shared by several phases (bytes) ----

def chunk_read(s, c: int | None = None) -> int:
    """Normaliser.chunk: stored chunk -> fp32 -> divided: peak while the result is made (the result is 4 c p d)."""
    c = s.c if c is None else c
    cpd = c * s.p * s.d
    return cpd * (F4 + max(F4 if s.stored_bytes != F4 else 0, s.stored_bytes))


def refit_work(s, c: int | None = None) -> int:
    """refit_adapters on a chunk, beyond its inputs w [c, p, d] and mixed [c, r, d]: W M^T (with bf16 copies of
    both operands), the Cholesky solve's column-major copy, the adapters, and the w.square() of the error."""
    c = s.c if c is None else c
    cpd, crd, cpr, crr = c * s.p * s.d, c * s.r * s.d, c * s.p * s.r, c * s.r * s.r
    cross = (2 * cpd + 2 * crd + 2 * cpr if s.low else 0) + F4 * cpr          # W M^T in bf16, then fp32
    solve = 2 * F4 * cpr + 3 * F4 * crr                                       # adapters + copy, Grams, factor
    return max(cross + 3 * F4 * crr, F4 * cpr + solve + F4 * cpd)             # ... then ||W||^2 term


def svd_work(s, rows: int, cols: int, c: int | None = None) -> int:
    """torch.linalg.svd(full_matrices=False) of c [rows, cols] fp32 matrices: column-major copy, U, S, Vh and the
    LAPACK gesdd workspace of one matrix (~ 4 k^2 + 4 max(rows, cols) floats, k = min)."""
    c = s.c if c is None else c
    k = min(rows, cols)
    return F4 * (c * rows * cols + c * (rows * k + k + k * cols) + 4 * k * k + 7 * k + 4 * max(rows, cols))


# ---- time terms shared by several phases (seconds) ----

def read_seconds(s, q) -> float:
    """One pass over the family: read from disk, upcast to fp32 and divide by the scales."""
    npd = s.n * s.p * s.d
    return npd * s.stored_bytes / q.read_bps + npd * (s.stored_bytes + 12) / q.stream


def refit_seconds(s, q) -> float:
    """refit_adapters for every expert: M M^T, W M^T, the Cholesky solves, A^T A, the error terms."""
    n, p, d, r = s.n, s.p, s.d, s.r
    return n * (2 * r * r * d / q.wd32 + 2 * p * d * r / q.wd + 2 * p * r * r / q.wd32 + q.chol
                + 8 * p * d / q.stream)


def compose_seconds(s, q) -> float:
    """codes @ bank for every expert."""
    return s.n * 2 * s.m * s.r * s.d / q.bank
