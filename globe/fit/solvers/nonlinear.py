"""Nonlinear bank fit: W_i ~= A_i phi(sum_j alpha_ij B_j) trained end to end, full batch, from a block SVD start.

Pure functions on tensors (no config, no files). The recipe:
  group_svd_init  each layer's experts split into `groups` contiguous groups; atom = top-r right factor of the
                  group's stacked SVD, A_i = the expert's rows of U S, logits one-hot on the expert's atom. The
                  atoms of all layers form ONE global bank whose codes start block-structured (a set of per-layer
                  banks); scope "global" lets every code reach every atom from there, "layer" keeps the blocks.
  fit_nonlinear   full-batch Adam at a constant learning rate on (bank, code logits, code gains) with the adapters
                  eliminated exactly at every step (variable projection: A_i = argmin, batched Cholesky, held
                  fixed for the gradient) or trained jointly (project=False, MoBE's recipe); the best state seen
                  is kept (checked every `eval_every` steps).
  finish          codes alpha_i = g_i softmax(logits_i) (or real codes, NonlinearState.make_signed) pruned below
                  eps * max, adapters refitted exactly.
Atoms start with entries ~1/sqrt(d), where tanh and silu are nearly linear, so training starts at the linear
(SVD) solution and moves into the nonlinear regime only where that lowers the error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from globe.errors import NumericalError
from globe.core.mixing import compose
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.config import FitConfig
from globe.fit.solvers.codes import code_values
from globe.fit.solvers.problem import FittedFactors
from globe.progress import progress

log = logging.getLogger(__name__)
NEG = -30.0          # logit of an atom a code may not use (softmax weight e^-30 ~ 1e-13, pruned at the end)


@dataclass
class NonlinearState:
    """Trainable state: bank [m, r, d], logits [N, m], log gains [N], adapters [N, p, r], allowed [N, m]."""

    bank: torch.Tensor
    logits: torch.Tensor
    log_gain: torch.Tensor
    adapters: torch.Tensor
    allowed: torch.Tensor
    history: list[float] = field(default_factory=list)
    best_err: float = math.inf
    signed: bool = False       # codes are g_i * logits_i (real) instead of g_i * softmax(logits_i)

    def codes(self) -> torch.Tensor:
        return codes_of(self.logits, self.log_gain, self.allowed, self.signed)

    def make_signed(self) -> "NonlinearState":
        """The same codes, parametrised as real numbers (an atom's code may then change sign)."""
        if not self.signed:
            codes = self.codes().detach().clone()
            self.logits, self.log_gain, self.signed = codes, torch.zeros_like(self.log_gain), True
        return self


def group_svd_init(weights: torch.Tensor, layers: torch.Tensor, groups: int, r: int,
                   scope: str = "global", own_logit: float = 4.0,
                   off_logit: float = -8.0) -> NonlinearState:
    """Block SVD start for weights [N, p, d] (normalised fp32), layers [N] layer index of each expert.

    Each layer's experts (in order) are split into `groups` contiguous groups; m = groups * n_layers atoms."""
    n, p, d = weights.shape
    layer_list = layers.unique().tolist()
    m = groups * len(layer_list)
    bank = torch.empty(m, r, d, dtype=torch.float32, device=weights.device)
    adapters = torch.empty(n, p, r, dtype=torch.float32, device=weights.device)
    logits = torch.zeros(n, m, dtype=torch.float32, device=weights.device)
    allowed = torch.ones(n, m, dtype=torch.bool, device=weights.device)
    for k, layer in enumerate(layer_list):
        idx = (layers == layer).nonzero().flatten()
        block = slice(k * groups, (k + 1) * groups)
        if scope == "layer":
            allowed[idx] = False
            allowed[idx[:, None], torch.arange(block.start, block.stop, device=weights.device)] = True
        logits[idx] = NEG if scope == "layer" else off_logit
        logits[idx, block] = 0.0
        for g, part in enumerate(torch.tensor_split(idx, groups)):
            if part.numel() == 0:
                raise NumericalError(f"layer {layer} has fewer experts than groups ({groups})")
            u, s, vt = torch.linalg.svd(weights[part].reshape(-1, d), full_matrices=False)   # [c p, k], [k, d]
            k_r = min(r, s.numel())
            atom = torch.zeros(r, d, dtype=torch.float32, device=weights.device)
            atom[:k_r] = vt[:k_r]
            bank[k * groups + g] = atom
            us = torch.zeros(part.numel() * p, r, dtype=torch.float32, device=weights.device)
            us[:, :k_r] = u[:, :k_r] * s[:k_r]
            adapters[part] = us.view(part.numel(), p, r)
            logits[part, k * groups + g] = own_logit
    logits = torch.where(allowed, logits, torch.full_like(logits, NEG))
    return NonlinearState(bank=bank, logits=logits, log_gain=torch.zeros(n, device=weights.device),
                          adapters=adapters, allowed=allowed)


def from_linear(bank: torch.Tensor, codes: torch.Tensor, adapters: torch.Tensor, off_logit: float = -10.0,
                atom_rms: float | None = None, grow: bool = False) -> NonlinearState:
    """Start from a linear (identity-phi) fit: bank [m, r, d], codes [N, m] >= 0, adapters [N, p, r].

    The bank is rescaled to entries of RMS `atom_rms` (default 1/sqrt(d): tanh/silu nearly linear there) and the
    gains take the inverse scale, so the mixed atoms are unchanged to first order. grow=False keeps each code's
    support (the stored parameter count cannot change); grow=True lets unused atoms in from logit `off_logit`."""
    m, r, d = bank.shape
    rms = float(bank.square().mean().sqrt().clamp_min(1e-30))
    c = (atom_rms if atom_rms is not None else d ** -0.5) / rms
    sums = codes.sum(-1).clamp_min(1e-30)                                         # [N]
    probs = codes / sums[:, None]
    logits = torch.where(probs > 0, probs.clamp_min(1e-30).log(), torch.full_like(probs, off_logit))
    return NonlinearState(bank=(bank * c).float().clone(), logits=logits.float(),
                          log_gain=(sums / c).log().float(), adapters=adapters.float().clone(),
                          allowed=torch.ones_like(codes, dtype=torch.bool) if grow else codes > 0)


def codes_of(logits: torch.Tensor, log_gain: torch.Tensor, allowed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """alpha_i = g_i softmax(logits_i) over the allowed atoms: [N, m], non-negative; signed: alpha_i = g_i logits_i
    on the allowed atoms (real codes). Both are globe.fit.solvers.codes.code_values at temperature 1."""
    if signed:
        return code_values(torch.where(allowed, logits, torch.zeros_like(logits)), log_gain, 1.0, "signed")
    return code_values(torch.where(allowed, logits, torch.full_like(logits, -math.inf)), log_gain, 1.0, "softmax")


@dataclass(frozen=True)
class NonlinearOptions:
    """What the full-batch nonlinear fit reads of the FitConfig (nonlinear.*, train.ridge / chunk_size,
    sparsity.eps)."""

    phi: str = "tanh"
    steps: int = 1000
    lr: float = 0.01              # constant, or cosine-annealed to lr_end
    project: bool = True          # adapters solved exactly at every step (False: trained by Adam too)
    eval_every: int = 25          # steps between checks of the best state
    ridge: float = 1e-6
    chunk: int = 256              # experts per chunk
    learn_gain: bool = True
    lr_end: float | None = None
    eps: float = 1e-3             # codes pruned below eps * max by finish
    off_logit: float = -10.0      # from_linear: the logit of a code that is zero in the linear fit
    signed_codes: bool = False    # codes of either sign (NonlinearState.make_signed)

    @classmethod
    def from_config(cls, cfg: FitConfig) -> NonlinearOptions:
        nl = cfg.nonlinear
        return cls(phi=nl.phi, steps=nl.steps, lr=nl.lr, eval_every=nl.eval_every, ridge=cfg.train.ridge,
                   chunk=cfg.train.chunk_size, learn_gain=nl.learn_gain, eps=cfg.sparsity.eps,
                   off_logit=nl.off_logit, signed_codes=nl.signed_codes)


def _loss(weights, state: NonlinearState, phi: str, project: bool, ridge: float, chunk: int,
          total: float) -> float:
    """Accumulates the gradient of sum_i ||W_i - A_i phi(alpha_i B)||^2 / total over expert chunks; returns it."""
    loss = 0.0
    codes_all = state.codes()
    for lo in range(0, weights.shape[0], chunk):
        hi = min(lo + chunk, weights.shape[0])
        w = weights[lo:hi]
        mixed = compose(codes_all[lo:hi], state.bank, phi)
        if project:
            with torch.no_grad():
                state.adapters[lo:hi] = refit_adapters(w, mixed, ridge).adapters
        part = (w - state.adapters[lo:hi] @ mixed).square().sum() / total
        part.backward(retain_graph=hi < weights.shape[0])
        loss += float(part.detach())
    return loss


def fit_nonlinear(weights: torch.Tensor, state: NonlinearState, options: NonlinearOptions) -> NonlinearState:
    """Full-batch Adam on the nonlinear bank objective from `state` (modified and returned: the best state seen).

    weights [N, p, d] fp32 (normalised); options.lr constant, or cosine-annealed to options.lr_end. options.project:
    adapters solved exactly at every step (not Adam parameters); False: adapters trained by Adam too (MoBE's recipe).
    The relative error of every step is in history; the best state is checked every `eval_every` steps."""
    o = options
    phi, steps, lr, project, eval_every, ridge, chunk, learn_gain, lr_end = (
        o.phi, o.steps, o.lr, o.project, o.eval_every, o.ridge, o.chunk, o.learn_gain, o.lr_end)
    total = float(weights.square().sum())
    params = [state.bank, state.logits] + ([state.log_gain] if learn_gain else [])
    params += [] if project else [state.adapters]
    for x in params:
        x.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = None if lr_end is None else torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), lr_end)
    best = None
    for step in progress(range(steps), "nonlinear"):
        opt.zero_grad()
        loss = _loss(weights, state, phi, project, ridge, chunk, total)
        if not math.isfinite(loss):
            log.warning("nonlinear fit: NaN/Inf at step %d, keeping the best state (rel_err %.5f)", step,
                        state.best_err)
            break
        state.history.append(math.sqrt(loss))
        if (step % eval_every == 0 or step == steps - 1) and state.history[-1] < state.best_err:
            state.best_err = state.history[-1]
            best = [x.detach().clone() for x in (state.bank, state.logits, state.log_gain, state.adapters)]
        opt.step()
        if sched is not None:
            sched.step()
    for x in params:
        x.requires_grad_(False)
    if best is not None:
        state.bank, state.logits, state.log_gain, state.adapters = best
    return state


def finish(weights: torch.Tensor, state: NonlinearState, options: NonlinearOptions) -> FittedFactors:
    """bank [m, r, d], codes [N, m] pruned below eps * max, adapters [N, p, r] refitted exactly, sq_err [N] (of the
    normalised weights)."""
    phi, eps, ridge, chunk = options.phi, options.eps, options.ridge, options.chunk
    with torch.no_grad():
        codes = state.codes()
        codes = torch.where(codes.abs() >= eps * codes.abs().amax(-1, keepdim=True), codes, torch.zeros_like(codes))
        adapters = torch.empty_like(state.adapters)
        sq_err = torch.empty(weights.shape[0], dtype=torch.float64)
        for lo in range(0, weights.shape[0], chunk):
            hi = min(lo + chunk, weights.shape[0])
            fit = refit_adapters(weights[lo:hi], compose(codes[lo:hi], state.bank, phi), ridge)
            adapters[lo:hi], sq_err[lo:hi] = fit.adapters, fit.sq_err.double().cpu()
    return FittedFactors(bank=state.bank.detach().clone(), codes=codes, adapters=adapters, sq_err=sq_err)
