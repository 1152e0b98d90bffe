"""Nonlinear bank fit (globe.fit.solvers.nonlinear): planted tanh mixtures, planted per-layer banks, linear starts."""
from __future__ import annotations

import math

import torch

from globe.fit.solvers.adapters import refit_adapters
from globe.core.mixing import compose
from globe.fit.solvers.nonlinear import (NonlinearOptions, NonlinearState, codes_of, finish, fit_nonlinear, from_linear,
                                         group_svd_init)


def _rel(w: torch.Tensor, sq: torch.Tensor) -> float:
    return math.sqrt(float(sq.sum()) / float(w.square().sum()))


def _planted_tanh(n=10, p=12, d=16, m=3, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=g) * 0.5
    alpha = torch.softmax(2 * torch.randn(n, m, generator=g), -1)                 # [n, m]
    adapters = torch.randn(n, p, r, generator=g)
    w = adapters @ torch.tanh((alpha @ bank.reshape(m, -1)).view(n, r, d))
    s = w.std()
    return w / s, bank, alpha, adapters / s, g


def test_planted_tanh_mix_is_recovered_from_a_nearby_start():
    w, bank, alpha, adapters, g = _planted_tanh()
    start = NonlinearState(bank=bank + 0.1 * torch.randn(bank.shape, generator=g),
                           logits=alpha.log() + 0.3 * torch.randn(alpha.shape, generator=g),
                           log_gain=torch.zeros(w.shape[0]), adapters=adapters.clone(),
                           allowed=torch.ones_like(alpha, dtype=torch.bool))
    state = fit_nonlinear(w, start, NonlinearOptions("tanh", steps=200, lr=0.01, eval_every=5))
    assert state.history[0] > 0.1                                  # the perturbed start is clearly off
    assert state.best_err < 0.02                                   # the planted mixture is recovered
    done = finish(w, state, NonlinearOptions("tanh"))
    codes, sq = done.codes, done.sq_err
    assert abs(_rel(w, sq) - state.best_err) < 1e-3                # best state kept, adapters refitted exactly
    assert bool((codes >= 0).all())


def test_tanh_fit_of_a_tanh_mixture_beats_the_linear_fit_from_the_same_start():
    w, *_ = _planted_tanh(n=12, m=3, r=3, seed=1)
    layers = torch.zeros(w.shape[0], dtype=torch.long)
    errs = {}
    for phi in ("identity", "tanh"):
        state = group_svd_init(w, layers, groups=3, r=3, scope="layer")
        state = fit_nonlinear(w, state, NonlinearOptions(phi, steps=150, lr=0.05, eval_every=5))
        assert state.best_err < state.history[0]                   # the refinement lowers the objective
        errs[phi] = state.best_err
    assert errs["tanh"] < 0.9 * errs["identity"]


def test_global_bank_recovers_planted_per_layer_banks():
    g = torch.Generator().manual_seed(2)
    n_layers, e, p, d, per, r = 3, 6, 10, 14, 2, 3
    parts = []
    for _ in range(n_layers):                                       # each layer mixes its own 2 atoms
        bank = torch.randn(per, r, d, generator=g)
        alpha = torch.rand(e, per, generator=g) + 0.1
        parts.append(torch.randn(e, p, r, generator=g) @ (alpha @ bank.reshape(per, -1)).view(e, r, d))
    w = torch.cat(parts)
    w = w / w.std()
    layers = torch.arange(n_layers).repeat_interleave(e)
    state = group_svd_init(w, layers, groups=per, r=r, scope="global")
    assert state.bank.shape == (n_layers * per, r, d)
    state = fit_nonlinear(w, state, NonlinearOptions("identity", steps=600, lr=0.03, eval_every=5))
    done = finish(w, state, NonlinearOptions("identity"))
    codes, sq = done.codes, done.sq_err
    assert _rel(w, sq) < 0.05
    block = torch.zeros_like(codes, dtype=torch.bool)
    for k in range(n_layers):
        block[k * e:(k + 1) * e, k * per:(k + 1) * per] = True
    assert float(codes[~block].sum() / codes.sum()) < 0.05       # the recovered structure is per layer


def test_group_svd_init_layer_scope_keeps_codes_in_the_layer_block():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 6, 9, generator=g)
    layers = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    state = group_svd_init(w, layers, groups=2, r=4, scope="layer")
    codes = codes_of(state.logits, state.log_gain, state.allowed)
    assert torch.allclose(codes.sum(-1), torch.ones(8))
    assert float(codes[:4, 2:].abs().sum() + codes[4:, :2].abs().sum()) == 0.0
    assert int(codes[0].argmax()) == 0 and int(codes[3].argmax()) == 1 and int(codes[5].argmax()) == 2


def test_from_linear_starts_at_the_linear_solution():
    g = torch.Generator().manual_seed(4)
    n, p, d, m, r = 8, 10, 12, 4, 3
    bank = torch.randn(m, r, d, generator=g)
    bank = bank / bank.reshape(m, -1).norm(dim=1)[:, None, None]                 # unit atoms as AM stores them
    codes = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) > 0.4)
    codes[:, 0] += 0.1
    w = torch.randn(n, p, r, generator=g) @ (codes @ bank.reshape(m, -1)).view(n, r, d)
    w = w + 0.05 * torch.randn(w.shape, generator=g)
    state = from_linear(bank, codes, torch.zeros(n, p, r))
    assert torch.allclose(codes_of(state.logits, state.log_gain, state.allowed)[:, :, None, None] * state.bank,
                          codes[:, :, None, None] * bank, atol=1e-5)                # same linear mixture
    assert bool((codes_of(state.logits, state.log_gain, state.allowed)[codes == 0] == 0).all())  # support kept
    mixed = (codes @ bank.reshape(m, -1)).view(n, r, d)
    err_lin = _rel(w, refit_adapters(w, mixed, 1e-6).sq_err)
    err_tanh = _rel(w, refit_adapters(w, compose(codes_of(state.logits, state.log_gain, state.allowed), state.bank,
                                             "tanh"), 1e-6).sq_err)
    assert abs(err_tanh - err_lin) < 0.01                           # tanh starts in its linear regime
