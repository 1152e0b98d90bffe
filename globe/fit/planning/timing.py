"""Time model of a fit: seconds per phase of fit_family from operation counts (flops of each kernel class, bytes
streamed, checkpoint bytes read) and the rates of this device, measured by a few-second micro-benchmark of the
dominant kernels at the real shapes (`measure_rates`).

    rates = measure_rates(shape, device)         # KernelRates (JSON round trip)
    phase_seconds(shape, rates)                  # {"normalize": s, ..., "total": s}

Kernel classes: `wd` the W M^T / A^T W products [p, d] x [d, r] in the product dtype (bf16 with train.precision),
`wd32` the same in fp32 (autograd path of variable projection, A^T A, M M^T), `wd64` in fp64 (the quantize stage),
`bank` the thin codes @ bank products [c, m] x [m, r d], `rr` the support Grams G_i B_a [r, r] x [r, d] (product
dtype), `chol` one r x r Cholesky with its p + d right-hand sides, `svd` one full SVD of a [p, d] expert, `align`
one r x r SVD, `stream` elementwise bandwidth. Reading the checkpoint is charged at `read_bps` (assumed: the dry run
reads no data, so it cannot measure the disk).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from globe.fit.costs import PHASE_COSTS
from globe.fit.planning.estimate import SOLVER_PHASES, FitShape
from globe.fit.warm_starts.targets import LARGE_MATRIX

READ_BPS = 1.0e9                  # assumed checkpoint read rate (bytes/s)


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
    wd64: float = 0.0             # flop/s of the W M^T products in fp64 (the quantize stage; 0: wd32 / 2)
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
    w64, mixed64 = w.double(), mixed.double()
    wd64 = 2 * c * p * d * r / _best(lambda: w64 @ mixed64, dev) if dev.type != "mps" else wd32
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
    return KernelRates(device=str(dev), wd=wd, wd32=wd32, wd64=wd64, bank=bank, rr=rr, chol=chol, svd=svd, align=align,
                       stream=stream, stream64=stream64, threads=torch.get_num_threads(),
                       benchmark_seconds=round(time.perf_counter() - t0, 3))














def phase_seconds(s: FitShape, q: KernelRates) -> dict[str, float]:
    """Predicted seconds of each phase as each declares it (globe.fit.costs; AM: all train.am_iters iterations, an
    upper bound when the tolerance stops it earlier; variable projection: varpro_evaluations(s) evaluations) and
    their total."""
    out = {name: round(PHASE_COSTS[name].seconds(s, q), 2) for name in SOLVER_PHASES}
    return out | {"total": round(sum(out.values()), 2)}
