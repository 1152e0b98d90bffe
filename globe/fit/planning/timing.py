"""Time model of a fit: seconds per phase of fit_family from operation counts (flops of each kernel class, bytes
streamed, checkpoint bytes read) and the rates of this device, measured by a few-second micro-benchmark of the
dominant kernels at the real shapes (`measure_rates`).

    rates = measure_rates(shape, device)         # KernelRates (JSON round trip)
    phase_seconds(shape, rates)                  # {"normalize": s, ..., "total": s}

Kernel classes: `wd` the W M^T / A^T W products [p, d] x [d, r] in the product dtype (bf16 with train.precision),
`wd32` the same in fp32 (autograd path of variable projection, A^T A, M M^T), `bank` the thin codes @ bank
products [c, m] x [m, r d], `rr` the support Grams G_i B_a [r, r] x [r, d] (product dtype), `chol` one r x r
Cholesky with its p + d right-hand sides, `svd` one full SVD of a [p, d] expert, `align` one r x r SVD,
`stream` elementwise bandwidth. Reading the checkpoint is charged at `read_bps` (assumed: the dry run reads no
data, so it cannot measure the disk).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from globe.fit.planning.estimate import FitShape
from globe.fit.warm_starts.base import WARM_STARTS
from globe.fit.warm_starts.targets import LARGE_MATRIX

READ_BPS = 1.0e9                  # assumed checkpoint read rate (bytes/s)
CG_APPLIES = 13                   # weighted MOD: 12 CG iterations + the initial residual


@dataclass
class KernelRates:
    """Measured rates on one device: flop/s per product class, seconds per expert for the factorisations."""

    device: str
    wd: float                     # flop/s
    wd32: float
    bank: float
    rr: float
    chol: float                   # seconds per expert (r x r Cholesky + solves with p and d right-hand sides)
    svd: float                    # seconds per expert (full SVD of [p, d])
    align: float                  # seconds per expert (SVD of [r, r])
    stream: float                 # bytes/s (bf16 -> fp32 upcast and scaling)
    stream64: float               # bytes/s (bf16 -> fp64 upcast, square, sum: the normaliser)
    read_bps: float = READ_BPS
    threads: int = 1
    benchmark_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelRates":
        return cls(**data)


def _once(fn, device: torch.device) -> float:
    """Wall time of one run of fn() (synchronised on CUDA), for kernels too slow to repeat."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return max(time.perf_counter() - t0, 1e-9)


def _best(fn, device: torch.device, reps: int = 2) -> float:
    """Best wall time of fn() over `reps` runs after one warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def measure_rates(s: FitShape, device: str | torch.device = "cpu", experts: int = 2) -> KernelRates:
    """Time each kernel class once at the fit's real (p, d, r, m) on `experts` experts (a few seconds on a CPU
    thread at Qwen1.5-MoE shapes; the SVD of one expert dominates)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    c, p, d, r, m, k = experts, s.p, s.d, s.r, s.m, min(s.slots, 4)
    low = torch.bfloat16 if s.low else torch.float32

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    w, mixed = rand(c, p, d), rand(c, d, r)
    wl, ml = w.to(low), mixed.to(low)
    wd = 2 * c * p * d * r / _best(lambda: wl @ ml, dev)
    wd32 = 2 * c * p * d * r / _best(lambda: w @ mixed, dev)
    cols = min(r * d, 2**18)
    codes, flat = rand(64, m), rand(m, cols)
    bank = 2 * 64 * m * cols / _best(lambda: codes @ flat, dev)
    grams, atoms = rand(k, r, r, dtype=low), rand(k, r, d, dtype=low)
    rr = 2 * k * r * r * d / _best(lambda: grams @ atoms, dev)
    spd = rand(c, r, r)
    spd = spd @ spd.transpose(1, 2) + r * torch.eye(r, device=dev)
    rhs_p, rhs_d = rand(c, r, p), rand(c, r, d)

    def chol_solves():
        f = torch.linalg.cholesky(spd)
        torch.cholesky_solve(rhs_p, f)
        torch.cholesky_solve(rhs_d, f)
    chol = _best(chol_solves, dev) / c
    if p * d < LARGE_MATRIX:                 # small experts: a first call's set-up would dwarf the SVD itself
        svd = _best(lambda: torch.linalg.svd(w, full_matrices=False), dev) / c
    else:
        one = w[:1]
        svd = _once(lambda: torch.linalg.svd(one, full_matrices=False), dev)
    align = _best(lambda: torch.linalg.svd(spd), dev) / c
    stored = w.to(torch.bfloat16)
    stream = c * p * d * (2 + 4 + 4 + 4) / _best(lambda: stored.to(torch.float32) / 3.0, dev)
    acc = torch.float32 if dev.type == "mps" else torch.float64
    stream64 = c * p * d * (2 + 3 * acc.itemsize) / _best(lambda: stored.to(acc).square().sum(), dev)
    return KernelRates(device=str(dev), wd=wd, wd32=wd32, bank=bank, rr=rr, chol=chol, svd=svd, align=align,
                       stream=stream, stream64=stream64, threads=torch.get_num_threads(),
                       benchmark_seconds=round(time.perf_counter() - t0, 3))


def _read(s: FitShape, q: KernelRates) -> float:
    """One pass over the family: read from disk, upcast to fp32 and divide by the scales."""
    npd = s.n * s.p * s.d
    return npd * s.stored_bytes / q.read_bps + npd * (s.stored_bytes + 12) / q.stream


def _refit(s: FitShape, q: KernelRates) -> float:
    """refit_adapters for every expert: M M^T, W M^T, the Cholesky solves, A^T A, the error terms."""
    n, p, d, r = s.n, s.p, s.d, s.r
    return n * (2 * r * r * d / q.wd32 + 2 * p * d * r / q.wd + 2 * p * r * r / q.wd32 + q.chol
                + 8 * p * d / q.stream)


def _compose(s: FitShape, q: KernelRates) -> float:
    return s.n * 2 * s.m * s.r * s.d / q.bank


def time_normalize(s: FitShape, q: KernelRates) -> float:
    npd = s.n * s.p * s.d
    return npd * s.stored_bytes / q.read_bps + npd * (s.stored_bytes + 24) / q.stream64


def time_shape(s: FitShape, q: KernelRates) -> float:
    if not s.probe_ranks:
        return 0.0
    n, p, d = s.n, s.p, s.d
    probes = sum(n * (q.align + 2 * r * r * d / q.wd32) + 2 * n * n * r * d / (q.wd32 / 2) for r in s.probe_ranks)
    return _read(s, q) + n * (q.svd + 2 * p * d * d / q.wd32) + probes


def time_warm_start(s: FitShape, q: KernelRates) -> float:
    n, p, d, r, m = s.n, s.p, s.d, s.r, s.m
    align = n * (q.align + 2 * r * r * d / q.wd32)
    if s.probe_ranks and r <= max(s.probe_ranks):
        targets = align
    else:
        exact = p * d < LARGE_MATRIX or 4 * r > min(p, d)
        top = q.svd if exact else 2 * 6 * p * d * (r + 16) / q.wd32
        targets = _read(s, q) + n * (top + 2 * p * d * d / q.wd32) + align
    init = WARM_STARTS.get(s.init)().seconds(s, q)                       # the warm start's own cost
    return targets + init * s.restarts


def time_am_iteration(s: FitShape, q: KernelRates) -> float:
    """One am_pass and its weighted MOD (conjugate gradients)."""
    n, p, d, r, m, k = s.n, s.p, s.d, s.r, s.m, s.slots
    per_expert = (2 * p * d * r / q.wd + 2 * r * r * d / q.wd32 + 4 * r * d * m / q.bank + 2 * m * r * d / q.bank
                  + 2 * k * r * r * d / q.rr + 2 * k * k * r * d / q.wd32 + q.chol + 8 * r * d * 4 / q.stream)
    loop = _read(s, q) + _refit(s, q) + _compose(s, q) + n * per_expert
    if s.mod == "weighted":
        mod = CG_APPLIES * n * (4 * m * r * d / q.bank + 2 * r * r * d / q.rr) + 12 * 12 * s.bank / q.stream
    else:
        mod = 2 * m * m * r * d / q.bank
    return loop + mod


def time_best_state(s: FitShape, q: KernelRates) -> float:
    return _read(s, q) + _compose(s, q) + _refit(s, q)


def varpro_evaluations(s: FitShape) -> int:
    """Evaluations of the variable projection predicted for train.varpro_steps L-BFGS iterations (about one
    line-search evaluation per iteration plus the first; L-BFGS allows up to 1.25 per iteration)."""
    return s.varpro_steps + 1 if s.varpro_steps else 0


def time_varpro_evaluation(s: FitShape, q: KernelRates) -> float:
    n, p, d, r = s.n, s.p, s.d, s.r
    autograd = n * (2 * 2 * p * d * r / q.wd32 + 4 * s.m * r * d / q.bank + 8 * p * d * 4 / q.stream)
    lbfgs = (4 * min(s.lbfgs_history(), max(s.varpro_steps - 1, 0)) + 20) * s.lbfgs_vector() / q.stream
    return _read(s, q) + _compose(s, q) + _refit(s, q) + autograd + lbfgs


def time_finalize(s: FitShape, q: KernelRates) -> float:
    metrics = 4 * s.m * s.m * s.r * s.d / (q.wd32 / 2)
    return _read(s, q) + _compose(s, q) + _refit(s, q) + metrics


def time_refine(s: FitShape, q: KernelRates) -> float:
    if not s.refine_steps:
        return 0.0
    b, p, d, r, m = min(s.refine_batch, s.n), s.p, s.d, s.r, s.m
    step = b * (6 * p * d * r / q.wd32 + 6 * m * r * d / q.bank + 12 * p * d * 4 / q.stream
                + p * d * s.stored_bytes / q.read_bps) + 16 * (s.adapters + s.bank) / q.stream
    return s.refine_steps * step + time_finalize(s, q)


def phase_seconds(s: FitShape, q: KernelRates) -> dict[str, float]:
    """Predicted seconds of each phase (AM: all train.am_iters iterations, an upper bound when the tolerance
    stops it earlier; variable projection: varpro_evaluations(s) evaluations) and their total."""
    cycles = s.cycles * s.restarts
    out = {"normalize": time_normalize(s, q), "shape": time_shape(s, q), "warm_start": time_warm_start(s, q),
           "am": cycles * (s.am_iters * time_am_iteration(s, q) + time_best_state(s, q)) if s.am_iters else 0.0,
           "varpro": cycles * varpro_evaluations(s) * time_varpro_evaluation(s, q),
           "refine": time_refine(s, q), "finalize": time_finalize(s, q)}
    out = {k: round(v, 2) for k, v in out.items()}
    return out | {"total": round(sum(out.values()), 2)}
