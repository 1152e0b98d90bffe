"""Alternating minimisation over one family (phi = identity inside the loop), streamed in expert chunks.

One pass per iteration: for each chunk, refit adapters to the current mixed atoms (batched Cholesky); pick each
expert's support with entmax on its targets Y_i = pinv(A_i) W_i at temperature T (controlled towards the target
median support); fit the code values by NNLS under the true objective ||W_i - A_i alpha_i B||^2 (A fixed, so
the Gram is weighted by A_i^T A_i); accumulate the MOD right-hand side. After the pass, the MOD update solves the
same weighted objective for the bank (preconditioned CG), and atoms are normalised with codes rescaled.
Adapters are never stored between iterations: they are a function of (bank, codes, W).

`Coder` holds what the coding step needs from the bank (its Gram, Cholesky factor, bf16 copy) and the sparsity
settings; `am_pass` = `_sweep` (the chunk loop) + `_new_bank` (the MOD update) + checks and statistics.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from globe import tracking
from globe.errors import NumericalError
from globe.device import acc_dtype
from globe.core.mixing import compose
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.config import FitConfig, SparsityConfig
from globe.fit.constants import support_cap
from globe.fit.costs import (F4, F8, chunk_read, compose_seconds, declare_cost, read_seconds, refit_seconds,
                             refit_work)
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.linalg import low_precision, matmul, ridge_cholesky, solve_left
from globe.fit.solvers.mod import ModAccumulator, apply_chunk, normalize_atoms, weighted_mod
from globe.fit.solvers.problem import SolverProblem
from globe.fit.solvers.sparse_coding import (code_chunk, finish_codes, select_support, support_sizes, weighted_nnls,
                                     weighted_support_gram)
from globe.progress import progress

log = logging.getLogger(__name__)


@dataclass
class AMState:
    """Everything the loop carries from one iteration to the next (all small except the bank)."""

    bank: torch.Tensor            # [m, r, d] unit-Frobenius atoms
    codes: torch.Tensor           # [N, m] non-negative sparse codes
    temperature: float
    iteration: int = 0
    best_err: float = math.inf    # relative error (original space) of best_bank/best_codes
    best_bank: torch.Tensor | None = None
    best_codes: torch.Tensor | None = None
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class AMOptions:
    """What alternating minimisation reads of the FitConfig."""

    iters: int                    # train.am_iters
    tol: float                    # train.tol (relative improvement that counts as converged)
    ridge: float                  # train.ridge
    chunk_size: int               # experts per chunk
    precision: str                # train.precision
    mod: str                      # train.mod: the dictionary update
    collect_stats: bool           # train.collect_stats (condition numbers in the statistics)
    sparsity: SparsityConfig      # support target, method, eps

    @classmethod
    def from_config(cls, cfg: FitConfig) -> AMOptions:
        t = cfg.train
        return cls(iters=t.am_iters, tol=t.tol, ridge=t.ridge, chunk_size=t.chunk_size, precision=t.precision,
                   mod=t.mod, collect_stats=t.collect_stats, sparsity=cfg.sparsity)


@dataclass
class Coder:
    """The bank-side quantities the coding step of one AM pass shares across chunks (bank fixed in the pass)."""

    bank: torch.Tensor                # [m, r, d]
    flat: torch.Tensor                # [m, r d]
    gram: torch.Tensor                # [m, m] atom Gram
    gram_chol: torch.Tensor           # [m, m] its ridged Cholesky factor
    low_bank: torch.Tensor | None     # bank in bf16 for the support Grams, or None
    sparsity: SparsityConfig
    ridge: float

    @classmethod
    def of(cls, bank: torch.Tensor, low: torch.dtype | None, sparsity: SparsityConfig, ridge: float) -> Coder:
        flat = bank.reshape(bank.shape[0], -1)
        gram = flat @ flat.T
        return cls(bank=bank, flat=flat, gram=gram, gram_chol=ridge_cholesky(gram, ridge),
                   low_bank=None if low is None else bank.to(low), sparsity=sparsity, ridge=ridge)

    def code(self, targets: torch.Tensor, atw: torch.Tensor, ata: torch.Tensor, temperature: float,
             comm: Comm = LOCAL) -> tuple[torch.Tensor, float]:
        """T and support from the pinv targets [c, r, d] (cheap search), values by NNLS under the true
        (A^T A-weighted) objective (atw = A^T W [c, r, d], ata = A^T A [c, r, r]). Returns (codes, next T)."""
        corr = targets.flatten(1) @ self.flat.T                                 # [c, m] selection
        _, used_t, next_t = code_chunk(corr, self.gram, self.gram_chol, temperature, self.sparsity, self.ridge,
                                       comm=comm)
        if corr.shape[0] == 0:
            return corr, next_t
        idx, valid = select_support(corr, self.gram_chol, used_t, self.sparsity.method,
                                    support_cap(self.sparsity.target_support))
        wcorr = atw.reshape(atw.shape[0], -1) @ self.flat.T                     # [c, m] <A^T W, B_j>
        sub_gram = weighted_support_gram(ata, self.bank, idx, low_bank=self.low_bank)   # [c, k, k]
        values = weighted_nnls(torch.gather(wcorr, 1, idx), sub_gram, valid, self.ridge)
        return finish_codes(values, idx, wcorr, self.sparsity.eps), next_t


@dataclass
class _Sweep:
    """What one pass over the chunks collects for the bank update and the statistics."""

    codes: torch.Tensor                           # [n, m] new codes
    sq_err: torch.Tensor                          # [n] adapter-refit error of the incoming state (normalised)
    temperature: float
    normal: ModAccumulator | None = None          # train.mod == "normal": m x m MOD on the pinv targets
    grams: torch.Tensor | None = None             # [n, r, r] A_i^T A_i for the weighted MOD
    rhs: torch.Tensor | None = None               # [m, r d] sum_i alpha_ij A_i^T W_i
    conds: list = field(default_factory=list)     # per-chunk max adapter condition estimates


def _sweep(problem: SolverProblem, state: AMState, options: AMOptions, low) -> _Sweep:
    """Per chunk: refit adapters, code against the bank, accumulate the MOD right-hand side."""
    weights, norm, comm = problem.weights, problem.norm, problem.comm
    ridge, dev, chunk = options.ridge, state.bank.device, options.chunk_size
    m, r, d = state.bank.shape
    n = weights.shape[0]
    coder = Coder.of(state.bank, low, options.sparsity, ridge)
    out = _Sweep(codes=torch.zeros_like(state.codes), sq_err=torch.zeros(n, dtype=acc_dtype(dev), device=dev),
                 temperature=state.temperature)
    if options.mod == "normal":
        out.normal = ModAccumulator(m, r, d, device=dev)
    else:
        out.grams, out.rhs = torch.empty(n, r, r, device=dev), torch.zeros(m, r * d, device=dev)
    for lo in range(0, comm.largest(n), chunk):
        lo, hi = min(lo, n), min(lo + chunk, n)                              # empty once this shard has run out
        w = norm.chunk(weights, lo, hi, dev)                                 # [c, p, d]
        fit = refit_adapters(w, compose(state.codes[lo:hi], state.bank), ridge, low)
        ata = fit.gram                                                       # [c, r, r] A^T A
        atw = matmul(fit.adapters.transpose(1, 2), w, low)                   # [c, r, d]
        targets = solve_left(ridge_cholesky(ata, ridge), atw)                # pinv(A) W
        codes, out.temperature = coder.code(targets, atw, ata, out.temperature, comm)
        if out.normal is not None:
            out.normal.add(codes, targets)
        else:
            out.rhs.addmm_(codes.T, atw.flatten(1))
            out.grams[lo:hi] = ata
        out.codes[lo:hi], out.sq_err[lo:hi] = codes, fit.sq_err.to(out.sq_err.dtype)
        if options.collect_stats and hi > lo:
            out.conds.append(fit.cond.max())
    return out


def _new_bank(sweep: _Sweep, previous: torch.Tensor, ridge: float, comm: Comm) -> tuple[torch.Tensor, int, float]:
    """(bank, CG iterations, condition number) of the dictionary update from a sweep."""
    if sweep.normal is not None:
        bank, cond = sweep.normal.solve(ridge, previous=previous, comm=comm)
        return bank, 0, cond
    comm.all_reduce(sweep.rhs)
    return weighted_mod(sweep.codes, sweep.grams, sweep.rhs.view(previous.shape), previous, ridge, comm=comm,
                        overwrite_rhs=True)                                 # rhs becomes the CG residual


def am_pass(problem: SolverProblem, state: AMState, options: AMOptions) -> dict:
    """One AM iteration in place on `state`; returns the iteration's stats (error is of the incoming state).

    Distributed, problem.weights/norm and state.codes hold this rank's experts; sums over experts are all-reduced.
    The objective is not read: AM runs on the work weights (phi = identity)."""
    weights, norm, comm = problem.weights, problem.norm, problem.comm
    t0, m = time.perf_counter(), state.bank.shape[0]
    low = low_precision(options.precision, weights.dtype, *weights.shape[1:], state.bank.device)   # bf16 or None
    sweep = _sweep(problem, state, options, low)
    bank, cg_iters, mod_cond = _new_bank(sweep, state.bank, options.ridge, comm)
    bank, new_codes = normalize_atoms(bank, sweep.codes)
    err = comm.all_reduce((sweep.sq_err.cpu().double() * norm.scales.double() ** 2).sum())
    rel = float((err / comm.all_reduce(norm.sq_norms.sum())).sqrt())
    bad_codes = comm.all_reduce_float(float(not bool(torch.isfinite(new_codes).all())))   # ranks with NaN codes
    if not (math.isfinite(rel) and bool(torch.isfinite(bank).all()) and bad_codes == 0):
        raise NumericalError(f"NaN/Inf in alternating minimisation at iteration {state.iteration} "
                             "(try a larger train.ridge or another bank.init)")
    if rel < state.best_err:
        state.best_err, state.best_bank, state.best_codes = rel, state.bank, state.codes
    median, mean, most = comm.support_stats(support_sizes(new_codes), m)
    stats = {"iteration": state.iteration, "rel_err": rel, "temperature": sweep.temperature, "median_support": median,
             "mean_support": mean, "max_support": most, "mod_cg_iters": cg_iters, "seconds": time.perf_counter() - t0}
    if options.collect_stats:
        cond = comm.all_reduce(torch.stack(sweep.conds).max() if sweep.conds else torch.zeros(()), "max")
        stats.update(adapter_cond_max=float(cond), mod_cond=mod_cond)
    state.bank, state.codes, state.temperature = bank, new_codes, sweep.temperature
    state.iteration += 1
    state.history.append(stats)
    return stats


def run_am(problem: SolverProblem, state: AMState, options: AMOptions, family: str = "",
           on_iteration: Callable[[AMState], None] | None = None) -> AMState:
    """Iterate am_pass until the iteration budget or the tolerance is reached; the best state is kept.

    Continues from state.iteration (a resumed state); on_iteration(state) is called after every iteration."""
    bar = progress(range(state.iteration, options.iters), f"AM {family}", total=options.iters,
                   initial=min(state.iteration, options.iters))
    done = state.history[len(state.history) - state.iteration:] if state.iteration else []
    prev = min((h["rel_err"] for h in done), default=math.inf)           # as if never interrupted
    for _ in bar:
        stats = am_pass(problem, state, options)
        bar.set_postfix(err=f"{stats['rel_err']:.4f}", supp=stats["median_support"], T=f"{stats['temperature']:.3g}")
        log.debug("AM %s iter %d: %s", family, stats["iteration"], stats)
        tracking.emit("am_iter", family=family, **stats)
        if prev - stats["rel_err"] < options.tol * max(prev, 1e-12) and stats["iteration"] >= 2:
            if abs(stats["median_support"] - options.sparsity.target_support) <= 1:
                log.info("AM %s converged at iteration %d (rel_err %.5f)", family, stats["iteration"], stats["rel_err"])
                break
        prev = min(prev, stats["rel_err"])
        if on_iteration is not None:
            on_iteration(state)
    return state


CG_APPLIES = 13                   # weighted MOD: 12 CG iterations + the initial residual


def _am_chunk(s) -> int:
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


def am_memory(s) -> int:
    """am_pass (the loop's largest moment) and the weighted MOD's conjugate gradients after it (the bf16 bank
    copy freed, the residual in the rhs), plus the settling error pass (chunk by chunk)."""
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


def am_iteration_seconds(s, q) -> float:
    """One am_pass and its weighted MOD (conjugate gradients)."""
    n, p, d, r, m, k = s.n, s.p, s.d, s.r, s.m, s.slots
    per_expert = (2 * p * d * r / q.wd + 2 * r * r * d / q.wd32 + 4 * r * d * m / q.bank + 2 * m * r * d / q.bank
                  + 2 * k * r * r * d / q.rr + 2 * k * k * r * d / q.wd32 + q.chol + 8 * r * d * 4 / q.stream)
    loop = read_seconds(s, q) + refit_seconds(s, q) + compose_seconds(s, q) + n * per_expert
    if s.mod == "weighted":
        mod = CG_APPLIES * n * (4 * m * r * d / q.bank + 2 * r * r * d / q.rr) + 12 * 12 * s.bank / q.stream
    else:
        mod = 2 * m * m * r * d / q.bank
    return loop + mod


def best_state_seconds(s, q) -> float:
    return read_seconds(s, q) + compose_seconds(s, q) + refit_seconds(s, q)


def am_seconds(s, q) -> float:
    """All train.am_iters iterations of every cycle and restart (an upper bound when the tolerance stops it
    earlier), each followed by the settling error pass."""
    if not s.am_iters:
        return 0.0
    return s.cycles * s.restarts * (s.am_iters * am_iteration_seconds(s, q) + best_state_seconds(s, q))


declare_cost("am", am_memory, am_seconds)
