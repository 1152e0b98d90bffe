"""The nonlinear stage of a family fit: the linear AM/VarPro solution -> full-batch nonlinear refinement
(globe.fit.solvers.nonlinear) with cfg.nonlinear's settings, in the normalised space of the engine's Normalizer.

Stage contract (what the engine gives and gets back): fitted = (bank [m, r, d], adapters [N, p, r] normalised,
codes [N, m], sq_err [N] original space) -> the same tuple for phi = cfg.nonlinear.phi, or the input unchanged
(with a warning) when the refinement did not lower the error."""
from __future__ import annotations

import logging

import torch

from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.costs import declare_cost
from globe.fit.objectives.base import Objective
from globe.fit.objectives.weights import WEIGHTS
from globe.fit.solvers.nonlinear import NonlinearOptions, finish, fit_nonlinear, from_linear
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.problem import FittedFactors, SolverProblem

log = logging.getLogger(__name__)


def nonlinear_applies(cfg: FitConfig, world: int = 1, objective: Objective = WEIGHTS) -> bool:
    """Whether the stage runs: enabled, steps > 0, one process, weight-space objective."""
    nl = cfg.nonlinear
    if not nl.enabled or nl.steps == 0:
        return False
    if cfg.train.refine_steps > 0:
        log.info("nonlinear refinement skipped: train.refine_steps > 0 selects the minibatch Adam refinement")
        return False
    if world > 1 or not objective.nonlinear_ok:
        log.warning("nonlinear refinement skipped: not supported in %s fits yet",
                    "distributed" if world > 1 else f"{objective.name} objective")
        return False
    return True


def nonlinear_stage(problem: SolverProblem, fitted: FittedFactors, options: NonlinearOptions, linear_phi: str,
                    family: str = "gate") -> tuple[FittedFactors, list[float], str]:
    """(fitted, loss history, phi of the result): the linear fit (phi = linear_phi) refined with options.phi, kept
    if the refinement raised the error. problem.weights [N, p, d] as stored (any dtype, lazy ok)."""
    norm, nl = problem.norm, options
    w = norm.chunk(problem.weights, 0, problem.weights.shape[0], fitted.bank.device)   # [N, p, d] fp32, full batch
    state = from_linear(fitted.bank, fitted.codes, fitted.adapters, nl.off_logit)
    if nl.signed_codes:
        state.make_signed()
    state = fit_nonlinear(w, state, options)
    new = finish(w, state, options)
    del w
    new.sq_err = new.sq_err * norm.scales.double() ** 2
    before, after = float(fitted.sq_err.sum()), float(new.sq_err.sum())
    if after > before:
        log.warning("%s: nonlinear refinement raised the error (%.5f -> %.5f): kept the linear fit", family,
                    (before / float(norm.sq_norms.sum())) ** 0.5, (after / float(norm.sq_norms.sum())) ** 0.5)
        return fitted, state.history, linear_phi
    log.info("%s: nonlinear (%s) refinement: rel_err %.5f -> %.5f in %d steps", family, nl.phi,
             (before / float(norm.sq_norms.sum())) ** 0.5, (after / float(norm.sq_norms.sum())) ** 0.5,
             len(state.history))
    return new, state.history, nl.phi


def group_rank(n: int, p: int, d: int, m: int, budget: float, codes_per_expert: int) -> int:
    """Largest rank r with bank m*r*d + adapters N*p*r + codes + N scales <= budget * N*p*d."""
    return int((budget * n * p * d - n * codes_per_expert - n) // (m * d + n * p))


def groups_applies(cfg: FitConfig, world: int = 1, objective: Objective = WEIGHTS) -> bool:
    """Whether the fit replaces warm start + AM by the block SVD start (nonlinear.start == "groups")."""
    return cfg.nonlinear.start == "groups" and nonlinear_applies(cfg, world, objective)


def groups_shape(cfg: FitConfig, ids: torch.Tensor, p: int, d: int) -> tuple[int, int, int]:
    """(m, r, groups per layer) of the block SVD start for experts ids [N, 2] (layer, expert) of shape [p, d]: the
    rank is cfg.bank.r or the largest that meets cfg.bank.budget."""
    nl, n = cfg.nonlinear, ids.shape[0]
    n_layers = int(ids[:, 0].unique().numel())
    groups = nl.groups or max(1, n // n_layers // 4)
    m = groups * n_layers
    per = groups if nl.scope == "layer" else m
    r = cfg.bank.r or min(p, d, group_rank(n, p, d, m, cfg.bank.budget, per))
    if r < 1:
        raise ConfigError(f"budget {cfg.bank.budget} leaves no rank for {m} atoms of N={n}, p={p}, d={d}: "
                          f"raise --budget or lower nonlinear.groups")
    return m, r, groups


def nonlinear_memory(s, start: str) -> int:
    """Peak bytes of the nonlinear phase (s: globe.fit.planning.estimate.FitShape): the full batch of normalised
    weights [N, p, d] fp32, the state (bank, logits, gains, adapters, mask), Adam's gradient and two moments and
    the best-state copy of the trained tensors, one chunk's autograd graph; start=am also holds the linear fit it
    refines and the refitted adapters of the result."""
    F4 = 4
    n, m, c = s.n, s.m, s.c
    w, bank, codes, adapters = n * s.p * s.d * F4, s.bank, n * m * F4, s.adapters
    state = bank + 2 * codes + n * F4 + adapters + n * m                  # + the allowed mask (bool)
    trained = bank + codes + n * F4
    adam = 3 * trained + trained + adapters                                # grad, exp_avg, exp_avg_sq; best copy
    graph = 3 * codes + F4 * c * (2 * s.p * s.d + 3 * s.r * s.d + 2 * s.p * s.r)      # residual and its square
    linear = (bank + adapters + codes + n * 8) if start == "am" else 0
    return w + state + adam + graph + linear + adapters


def nonlinear_seconds(s, q, steps: int) -> float:
    """Seconds of the nonlinear phase: per Adam step, every expert's mixed atoms (codes @ bank), the exact adapter
    refit and the backward products, then one finishing refit."""
    n, p, d, r, m = s.n, s.p, s.d, s.r, s.m
    per_expert = 3 * 2 * m * r * d / q.bank + 6 * p * d * r / q.wd32 + 4 * r * r * d / q.wd32 + q.chol \
        + 10 * p * d * 4 / q.stream
    return (steps + 1) * n * per_expert


declare_cost("nonlinear", lambda s: nonlinear_memory(s, s.nonlinear_start),
             lambda s, q: nonlinear_seconds(s, q, s.nonlinear_steps))


def groups_fit(weights: torch.Tensor, ids: torch.Tensor, norm: Normalizer, cfg: FitConfig,
               family: str = "gate", device: torch.device | str = "cpu") -> tuple[FittedFactors, list[float], str]:
    """Block SVD start (groups per layer, one global bank) + nonlinear refinement; (fitted, history, phi).

    weights [N, p, d] as stored, ids [N, 2] (layer, expert), experts of a layer contiguous. The rank is
    cfg.bank.r or the largest that meets cfg.bank.budget; fitted as for nonlinear_stage."""
    from globe.fit.solvers.nonlinear import group_svd_init
    nl, (n, p, d) = cfg.nonlinear, weights.shape
    layers = ids[:, 0]
    m, r, groups = groups_shape(cfg, ids, p, d)
    log.info("fitting %s: N=%d p=%d d=%d with m=%d (%d per layer) r=%d, %s, %d steps", family, n, p, d, m, groups,
             r, nl.phi, nl.steps)
    w = norm.chunk(weights, 0, n, device)                                       # [N, p, d] fp32, full batch
    state = group_svd_init(w, layers.to(w.device), groups, r, nl.scope)
    if nl.signed_codes:
        state.make_signed()
    options = NonlinearOptions.from_config(cfg)
    state = fit_nonlinear(w, state, options)
    fitted = finish(w, state, options)
    fitted.sq_err = fitted.sq_err * norm.scales.double() ** 2
    return fitted, state.history, nl.phi
