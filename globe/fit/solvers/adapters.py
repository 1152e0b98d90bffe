"""Mixed atoms tilde_B_i = phi(sum_j alpha_ij B_j), the batched-Cholesky adapter refit, coding targets and
the reconstruction error, all for one chunk of experts (PHI and compose come from globe.core.mixing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from globe.core.mixing import compose
from globe.fit.costs import F4, F8, compose_seconds, declare_cost, read_seconds, refit_seconds, refit_work
from globe.fit.solvers.linalg import cond_from_cholesky, matmul, ridge_cholesky, solve_left, solve_right
from globe.fit.config import FitConfig
from globe.fit.solvers.problem import Factors, SolverProblem


@dataclass
class AdapterFit:
    """Result of refitting one chunk's adapters."""

    adapters: torch.Tensor   # [c, p, r]
    sq_err: torch.Tensor     # [c] ||W_i - A_i tilde_B_i||^2 (normalised space)
    cond: torch.Tensor       # [c] condition estimate of tilde_B tilde_B^T
    gram: torch.Tensor       # [c, r, r] A_i^T A_i (reused by the coding step)


def refit_adapters(weights: torch.Tensor, mixed: torch.Tensor, ridge: float,
                   low: torch.dtype | None = None) -> AdapterFit:
    """A_i = W_i M_i^T (M_i M_i^T + lambda I)^-1 for weights [c, p, d], mixed M [c, r, d].

    The error uses ||W||^2 - 2 <A, W M^T> + <A^T A, M M^T>, so no [c, p, d] residual is formed. With `low`
    (bf16) the cross term W M^T, the largest product, is computed from rounded operands: A is the minimiser, so
    its error raises the objective only to second order; the Gram M M^T stays fp32.
    """
    mmt = mixed @ mixed.transpose(1, 2)                                    # [c, r, r]
    wmt = matmul(weights, mixed.transpose(1, 2), low)                      # [c, p, r]
    chol = ridge_cholesky(mmt, ridge)
    adapters = solve_right(wmt, chol)                                      # [c, p, r]
    ata = adapters.transpose(1, 2) @ adapters                              # [c, r, r]
    sq = weights.square().sum((1, 2)) - 2 * (adapters * wmt).sum((1, 2)) + (ata * mmt).sum((1, 2))
    return AdapterFit(adapters=adapters, sq_err=sq.clamp_min(0), cond=cond_from_cholesky(chol), gram=ata)


def coding_targets(weights: torch.Tensor, adapters: torch.Tensor, ridge: float) -> torch.Tensor:
    """Y_i = pinv(A_i) W_i = (A_i^T A_i + lambda I)^-1 A_i^T W_i: [c, r, d]."""
    ata = adapters.transpose(1, 2) @ adapters                              # [c, r, r]
    return solve_left(ridge_cholesky(ata, ridge), adapters.transpose(1, 2) @ weights)


class Adapted(NamedTuple):
    """Exact adapters for fixed (bank, codes) and their error."""

    adapters: torch.Tensor        # [N, p, r] in the normalised space
    codes: torch.Tensor           # [N, m] (on the simplex for identity phi)
    sq_err: torch.Tensor          # [N] fp64 on the CPU, original space (of the objective)


@dataclass(frozen=True)
class FinalizeOptions:
    """What the exact adapter refit reads of the FitConfig."""

    phi: str                      # bank.phi ("identity" for the AM's own error)
    chunk_size: int               # experts per chunk
    ridge: float                  # train.ridge

    @classmethod
    def from_config(cls, cfg: FitConfig, phi: str | None = None) -> FinalizeOptions:
        return cls(phi=cfg.bank.phi if phi is None else phi, chunk_size=cfg.train.chunk_size, ridge=cfg.train.ridge)


def finalize(problem: SolverProblem, state: Factors, options: FinalizeOptions, keep_adapters: bool = True) -> Adapted:
    """Exact adapters for phi(codes @ bank) of state under problem.objective, chunk by chunk, in the normalised
    space.

    With identity phi the codes are put on the simplex and their row sums moved into the adapters. The error is
    the objective's ||(W_i - A_i M_i) R_i||^2 in the original space. keep_adapters=False: only the errors are
    wanted (adapters is None; no [N, p, r] buffer)."""
    weights, norm, objective = problem.weights, problem.norm, problem.objective
    bank, codes, phi, chunk, ridge = state.bank, state.codes, options.phi, options.chunk_size, options.ridge
    n, dev = weights.shape[0], bank.device
    if phi == "identity":
        codes = codes / codes.sum(-1, keepdim=True).clamp_min(1e-30)
    adapters = torch.empty(n, weights.shape[1], bank.shape[1], device=dev) if keep_adapters else None
    sq_err = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        w = objective.targets(weights, norm, lo, hi, dev)
        mixed = objective.right(compose(codes[lo:hi], bank, phi), lo, hi)
        fit = refit_adapters(w, mixed, ridge)
        if adapters is not None:
            adapters[lo:hi] = fit.adapters
        sq_err[lo:hi] = fit.sq_err.double().cpu() * norm.scales[lo:hi].double() ** 2
    return Adapted(adapters, codes, sq_err)


def finalize_memory(s) -> int:
    """finalize (exact adapters, chunk by chunk), folded in place, and the bank metrics: the bank in fp64 with its
    SVD copy / unit rows, or for large banks the m x m Gram accumulated over column blocks."""
    from globe.fit.solvers.metrics import GRAM_METRICS_BYTES
    chunk = F4 * s.c * (s.p * s.d + s.r * s.d) + refit_work(s)
    big = s.m * s.r * s.d * F8 > GRAM_METRICS_BYTES
    metrics = 2 * s.m * 2**16 * F8 + 3 * s.m * s.m * F8 if big else 2 * 2 * s.bank + 2 * s.m * s.m * F8
    return s.bank + s.adapters + max(chunk, metrics)


def finalize_seconds(s, q) -> float:
    """One pass: mixed atoms, exact adapters, and the bank metrics."""
    metrics = 4 * s.m * s.m * s.r * s.d / (q.wd32 / 2)
    return read_seconds(s, q) + compose_seconds(s, q) + refit_seconds(s, q) + metrics


declare_cost("finalize", finalize_memory, finalize_seconds)
