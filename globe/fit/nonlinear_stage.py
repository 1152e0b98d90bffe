"""The nonlinear stage of a family fit: the linear AM/VarPro solution -> full-batch nonlinear refinement
(globe.fit.nonlinear) with cfg.nonlinear's settings, in the normalised space of the engine's Normalizer.

Stage contract (what the engine gives and gets back): fitted = (bank [m, r, d], adapters [N, p, r] normalised,
codes [N, m], sq_err [N] original space) -> the same tuple for phi = cfg.nonlinear.phi, or the input unchanged
(with a warning) when the refinement did not lower the error."""
from __future__ import annotations

import logging

import torch

from globe.fit.config import FitConfig
from globe.fit.nonlinear import finish, fit_nonlinear, from_linear
from globe.fit.normalize import Normalizer

log = logging.getLogger(__name__)


def nonlinear_applies(cfg: FitConfig, world: int = 1, whiten=None) -> bool:
    """Whether the stage runs: enabled, steps > 0, one process, weight-space objective."""
    nl = cfg.nonlinear
    if not nl.enabled or nl.steps == 0:
        return False
    if cfg.train.refine_steps > 0:
        log.info("nonlinear refinement skipped: train.refine_steps > 0 selects the minibatch Adam refinement")
        return False
    if world > 1 or whiten is not None:
        log.warning("nonlinear refinement skipped: not supported in %s fits yet",
                    "distributed" if world > 1 else "activation-aware")
        return False
    return True


def nonlinear_stage(weights: torch.Tensor, norm: Normalizer, fitted: tuple, cfg: FitConfig,
                    family: str = "gate") -> tuple[tuple, list[float], str]:
    """(fitted tuple, loss history, phi of the result). weights [N, p, d] as stored (any dtype, lazy ok)."""
    bank, adapters, codes, sq_err = fitted
    nl, dev = cfg.nonlinear, bank.device
    w = norm.chunk(weights, 0, weights.shape[0], dev)                        # [N, p, d] fp32, full batch
    state = from_linear(bank, codes, adapters, nl.off_logit)
    state = fit_nonlinear(w, state, nl.phi, nl.steps, nl.lr, eval_every=nl.eval_every, ridge=cfg.train.ridge,
                          chunk=cfg.train.chunk_size, learn_gain=nl.learn_gain)
    new_bank, new_codes, new_adapters, new_sq = finish(w, state, nl.phi, cfg.sparsity.eps, cfg.train.ridge,
                                                       cfg.train.chunk_size)
    del w
    new_sq = new_sq * norm.scales.double() ** 2
    before, after = float(sq_err.sum()), float(new_sq.sum())
    if after > before:
        log.warning("%s: nonlinear refinement raised the error (%.5f -> %.5f): kept the linear fit", family,
                    (before / float(norm.sq_norms.sum())) ** 0.5, (after / float(norm.sq_norms.sum())) ** 0.5)
        return fitted, state.history, cfg.bank.phi
    log.info("%s: nonlinear (%s) refinement: rel_err %.5f -> %.5f in %d steps", family, nl.phi,
             (before / float(norm.sq_norms.sum())) ** 0.5, (after / float(norm.sq_norms.sum())) ** 0.5,
             len(state.history))
    return (new_bank, new_adapters, new_codes, new_sq), state.history, nl.phi
