"""Alternating minimisation over one family (phi = identity inside the loop), streamed in expert chunks.

One pass per iteration: for each chunk, refit adapters to the current mixed atoms (batched Cholesky); pick each
expert's support with entmax on its targets Y_i = pinv(A_i) W_i at temperature T (controlled towards the target
median support); fit the code values by NNLS under the true objective ||W_i - A_i alpha_i B||^2 (A fixed, so
the Gram is weighted by A_i^T A_i); accumulate the MOD right-hand side. After the pass, the MOD update solves the
same weighted objective for the bank (preconditioned CG), and atoms are normalised with codes rescaled.
Adapters are never stored between iterations: they are a function of (codes, bank, W).
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
from globe.fit.adapters import compose, refit_adapters
from globe.fit.config import FitConfig
from globe.fit.distributed import LOCAL, Comm
from globe.fit.linalg import low_precision, matmul, ridge_cholesky, solve_left
from globe.fit.mod import ModAccumulator, normalize_atoms, weighted_mod
from globe.fit.normalize import Normalizer
from globe.fit.sparse_coding import (finish_codes, select_support, sparse_code, support_sizes, update_temperature,
                                     weighted_nnls, weighted_support_gram)
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


def code_chunk(corr, gram, gram_chol, temperature, cfg: FitConfig, retries: int = 8, comm: Comm = LOCAL):
    """Codes for one chunk with temperature control: re-codes with a corrected T while the chunk's median support
    is off target by more than 1. Returns (codes, T used for them, T for the next chunk).

    Distributed, the chunk is the union of every rank's chunk at this step (median over all of them); a rank
    whose shard has run out passes an empty corr [0, m] and only takes part in the reductions."""
    sp, ridge = cfg.sparsity, cfg.train.ridge
    for _ in range(retries):
        used = temperature
        codes = sparse_code(corr, gram, gram_chol, used, sp, ridge) if corr.shape[0] else torch.zeros_like(corr)
        median = comm.median(support_sizes(codes), corr.shape[1])
        temperature = update_temperature(used, median, sp)
        if abs(median - sp.target_support) <= 1 or temperature == used:
            break
    return codes, used, temperature


def _code_weighted(targets, atw, ata, flat, bank, gram, gram_chol, temperature, cfg, comm: Comm = LOCAL,
                   low_bank=None):
    """T and support from the pinv targets (cheap search), values by NNLS under the true (A^T A-weighted)
    objective. Returns (codes, T for the next chunk). low_bank: bank in bf16 for the support Grams."""
    corr = targets.flatten(1) @ flat.T                                     # [c, m] selection
    _, used_t, next_t = code_chunk(corr, gram, gram_chol, temperature, cfg, comm=comm)
    if corr.shape[0] == 0:
        return corr, next_t
    idx, valid = select_support(corr, gram_chol, used_t, cfg.sparsity.method, 4 * cfg.sparsity.target_support + 4)
    wcorr = atw.reshape(atw.shape[0], -1) @ flat.T                            # [c, m] <A^T W, B_j>
    sub_gram = weighted_support_gram(ata, bank, idx, low_bank=low_bank)       # [c, k, k]
    values = weighted_nnls(torch.gather(wcorr, 1, idx), sub_gram, valid, cfg.train.ridge)
    return finish_codes(values, idx, wcorr, cfg.sparsity.eps), next_t


def am_pass(weights: torch.Tensor, norm: Normalizer, state: AMState, cfg: FitConfig, comm: Comm = LOCAL) -> dict:
    """One AM iteration in place on `state`; returns the iteration's stats (error is of the incoming state).

    Distributed, weights/norm/state.codes hold this rank's experts; sums over experts are all-reduced."""
    t0, ridge, dev = time.perf_counter(), cfg.train.ridge, state.bank.device
    m, r, d = state.bank.shape
    n, p = weights.shape[:2]
    low = low_precision(cfg.train.precision, weights.dtype, p, d, dev)     # bf16 for tolerant products, or None
    low_bank = None if low is None else state.bank.to(low)
    flat = state.bank.reshape(m, r * d)
    gram = flat @ flat.T                                                     # [m, m]
    gram_chol = ridge_cholesky(gram, ridge)
    normal = ModAccumulator(m, r, d, device=dev) if cfg.train.mod == "normal" else None
    grams = torch.empty(n, r, r, device=dev) if normal is None else None     # A_i^T A_i for the weighted MOD
    rhs = torch.zeros(m, r * d, device=dev) if normal is None else None      # sum_i alpha_ij A_i^T W_i
    new_codes = torch.zeros_like(state.codes)
    sq_err = torch.zeros(n, dtype=acc_dtype(dev), device=dev)
    conds, temp = [], state.temperature
    for lo in range(0, comm.largest(n), cfg.train.chunk_size):
        lo, hi = min(lo, n), min(lo + cfg.train.chunk_size, n)              # empty once this shard has run out
        w = norm.chunk(weights, lo, hi, dev)                                 # [c, p, d]
        fit = refit_adapters(w, compose(state.codes[lo:hi], state.bank), ridge, low)
        ata = fit.gram                                                       # [c, r, r] A^T A
        atw = matmul(fit.adapters.transpose(1, 2), w, low)                   # [c, r, d]
        targets = solve_left(ridge_cholesky(ata, ridge), atw)                # pinv(A) W
        codes, temp = _code_weighted(targets, atw, ata, flat, state.bank, gram, gram_chol, temp, cfg, comm,
                                     low_bank)
        if normal is not None:
            normal.add(codes, targets)
        else:
            rhs.addmm_(codes.T, atw.flatten(1))
            grams[lo:hi] = ata
        new_codes[lo:hi], sq_err[lo:hi] = codes, fit.sq_err.to(sq_err.dtype)
        if cfg.train.collect_stats and hi > lo:
            conds.append(fit.cond.max())
    del low_bank                                                              # freed before the MOD's vectors
    if normal is not None:
        (bank, mod_cond), cg_iters = normal.solve(ridge, previous=state.bank, comm=comm), 0
    else:
        comm.all_reduce(rhs)
        bank, cg_iters, mod_cond = weighted_mod(new_codes, grams, rhs.view(m, r, d), state.bank, ridge, comm=comm,
                                                overwrite_rhs=True)
    bank, new_codes = normalize_atoms(bank, new_codes)
    err = comm.all_reduce((sq_err.cpu().double() * norm.scales.double() ** 2).sum())
    rel = float((err / comm.all_reduce(norm.sq_norms.sum())).sqrt())
    bad_codes = comm.all_reduce_float(float(not bool(torch.isfinite(new_codes).all())))   # ranks with NaN codes
    if not (math.isfinite(rel) and bool(torch.isfinite(bank).all()) and bad_codes == 0):
        raise NumericalError(f"NaN/Inf in alternating minimisation at iteration {state.iteration} "
                             "(try a larger train.ridge or another bank.init)")
    if rel < state.best_err:
        state.best_err, state.best_bank, state.best_codes = rel, state.bank, state.codes
    median, mean, most = comm.support_stats(support_sizes(new_codes), m)
    stats = {"iteration": state.iteration, "rel_err": rel, "temperature": temp, "median_support": median,
             "mean_support": mean, "max_support": most, "mod_cg_iters": cg_iters, "seconds": time.perf_counter() - t0}
    if cfg.train.collect_stats:
        cond = comm.all_reduce(torch.stack(conds).max() if conds else torch.zeros(()), "max")
        stats.update(adapter_cond_max=float(cond), mod_cond=mod_cond)
    state.bank, state.codes, state.temperature = bank, new_codes, temp
    state.iteration += 1
    state.history.append(stats)
    return stats


def run_am(weights: torch.Tensor, norm: Normalizer, state: AMState, cfg: FitConfig, family: str = "",
           on_iteration: Callable[[AMState], None] | None = None, comm: Comm = LOCAL) -> AMState:
    """Iterate am_pass until the iteration budget or the tolerance is reached; the best state is kept.

    Continues from state.iteration (a resumed state); on_iteration(state) is called after every iteration."""
    bar = progress(range(state.iteration, cfg.train.am_iters), f"AM {family}")
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
