"""Alternating minimisation over one family (phi = identity inside the loop), streamed in expert chunks.

One pass per iteration: for each chunk, refit adapters to the current mixed atoms (batched Cholesky); pick each
expert's support with entmax on its targets Y_i = pinv(A_i) W_i at temperature T (controlled towards the target
median support); fit the code values by NNLS under the true objective ||W_i - A_i alpha_i B||^2 (A fixed, so
the Gram is weighted by A_i^T A_i); accumulate the MOD right-hand side. After the pass, the MOD update solves the
same weighted objective for the bank (preconditioned CG), and atoms are normalised with codes rescaled.
Adapters are never stored between iterations: they are a function of (codes, bank, W).

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
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.linalg import low_precision, matmul, ridge_cholesky, solve_left
from globe.fit.solvers.mod import ModAccumulator, normalize_atoms, weighted_mod
from globe.fit.solvers.normalize import Normalizer
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


def _sweep(weights: torch.Tensor, norm: Normalizer, state: AMState, cfg: FitConfig, low, comm: Comm) -> _Sweep:
    """Per chunk: refit adapters, code against the bank, accumulate the MOD right-hand side."""
    ridge, dev, chunk = cfg.train.ridge, state.bank.device, cfg.train.chunk_size
    m, r, d = state.bank.shape
    n = weights.shape[0]
    coder = Coder.of(state.bank, low, cfg.sparsity, ridge)
    out = _Sweep(codes=torch.zeros_like(state.codes), sq_err=torch.zeros(n, dtype=acc_dtype(dev), device=dev),
                 temperature=state.temperature)
    if cfg.train.mod == "normal":
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
        if cfg.train.collect_stats and hi > lo:
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


def am_pass(weights: torch.Tensor, norm: Normalizer, state: AMState, cfg: FitConfig, comm: Comm = LOCAL) -> dict:
    """One AM iteration in place on `state`; returns the iteration's stats (error is of the incoming state).

    Distributed, weights/norm/state.codes hold this rank's experts; sums over experts are all-reduced."""
    t0, m = time.perf_counter(), state.bank.shape[0]
    low = low_precision(cfg.train.precision, weights.dtype, *weights.shape[1:], state.bank.device)   # bf16 or None
    sweep = _sweep(weights, norm, state, cfg, low, comm)
    bank, cg_iters, mod_cond = _new_bank(sweep, state.bank, cfg.train.ridge, comm)
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
    if cfg.train.collect_stats:
        cond = comm.all_reduce(torch.stack(sweep.conds).max() if sweep.conds else torch.zeros(()), "max")
        stats.update(adapter_cond_max=float(cond), mod_cond=mod_cond)
    state.bank, state.codes, state.temperature = bank, new_codes, sweep.temperature
    state.iteration += 1
    state.history.append(stats)
    return stats


def run_am(weights: torch.Tensor, norm: Normalizer, state: AMState, cfg: FitConfig, family: str = "",
           on_iteration: Callable[[AMState], None] | None = None, comm: Comm = LOCAL) -> AMState:
    """Iterate am_pass until the iteration budget or the tolerance is reached; the best state is kept.

    Continues from state.iteration (a resumed state); on_iteration(state) is called after every iteration."""
    bar = progress(range(state.iteration, cfg.train.am_iters), f"AM {family}", total=cfg.train.am_iters,
                   initial=min(state.iteration, cfg.train.am_iters))
    done = state.history[len(state.history) - state.iteration:] if state.iteration else []
    prev = min((h["rel_err"] for h in done), default=math.inf)           # as if never interrupted
    for _ in bar:
        stats = am_pass(weights, norm, state, cfg, comm)
        bar.set_postfix(err=f"{stats['rel_err']:.4f}", supp=stats["median_support"], T=f"{stats['temperature']:.3g}")
        log.debug("AM %s iter %d: %s", family, stats["iteration"], stats)
        tracking.emit("am_iter", family=family, **stats)
        if prev - stats["rel_err"] < cfg.train.tol * max(prev, 1e-12) and stats["iteration"] >= 2:
            if abs(stats["median_support"] - cfg.sparsity.target_support) <= 1:
                log.info("AM %s converged at iteration %d (rel_err %.5f)", family, stats["iteration"], stats["rel_err"])
                break
        prev = min(prev, stats["rel_err"])
        if on_iteration is not None:
            on_iteration(state)
    return state
