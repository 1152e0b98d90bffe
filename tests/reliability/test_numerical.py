"""Numerical guards: ill-conditioned systems are regularised and logged (never NaN), diverging refinement is
rolled back with a warning, and a fit on degenerate experts stays finite."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from globe.errors import NumericalError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.solvers.linalg import condition_number, ridge_cholesky, solve_left
from globe.fit.solvers.adam import AdamOptions, DivergenceGuard, adam_refine
from globe.fit.solvers.problem import Factors, SolverProblem
from globe.fit.solvers.normalize import Normalizer
from tests.helpers.planted import make_planted


def test_singular_system_is_regularised_and_its_condition_logged(caplog):
    v = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    gram = torch.stack([v @ v.T, torch.eye(6)])                # rank 2 of 6, and a healthy one
    with caplog.at_level(logging.WARNING):
        chol = ridge_cholesky(gram, ridge=0.0)
    assert torch.isfinite(chol).all()
    assert "ill-conditioned system in 1 of 2 solves (condition number" in caplog.text
    x = solve_left(chol, torch.ones(2, 6, 1))
    assert torch.isfinite(x).all()
    assert torch.allclose(chol[1], torch.eye(6) * math.sqrt(1 + 1e-12), atol=1e-6)   # the healthy one untouched


def test_condition_number_matches_eigenvalues():
    gram = torch.diag(torch.tensor([1e4, 1.0, 1e-2]))
    assert condition_number(gram) == pytest.approx(1e6)
    assert condition_number(torch.full((2, 2), float("nan"))) == math.inf


def test_nan_system_is_a_numerical_error_not_a_nan_result():
    with pytest.raises(NumericalError, match="NaN/Inf"):
        ridge_cholesky(torch.full((1, 3, 3), float("nan")), 1e-6)


def test_fit_on_degenerate_experts_is_finite():
    """Identical rank-1 experts: every Gram is singular; the fit must regularise, not produce NaN."""
    u = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    w = (u @ torch.randn(1, 24, generator=torch.Generator().manual_seed(2))).expand(12, 16, 24).clone()
    ids = torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], 1)
    cfg = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=4, varpro_steps=5, ridge=0.0))
    fam = fit_family(w, ids, cfg)
    assert all(torch.isfinite(t).all() for t in (fam.bank, fam.codes, fam.adapters))
    assert fam.metrics["rel_err"] < 1e-3


def test_guard_rolls_back_to_the_last_snapshot_and_halves_the_lr(caplog):
    x = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([x], lr=0.1)
    guard = DivergenceGuard([x], opt, every=1)
    assert guard.check(1.0, 0)                                 # snapshot of x = 1
    with torch.no_grad():
        x.fill_(7.0)
    with caplog.at_level(logging.WARNING):
        assert not guard.check(float("nan"), 1)
    assert torch.equal(x.detach(), torch.ones(3)) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert "rolled back to the last good state" in caplog.text
    assert not guard.check(100.0, 2) and not guard.check(100.0, 3) and guard.exhausted


def test_diverging_adam_is_rolled_back_not_nan(caplog):
    planted = make_planted(n=24, seed=4)
    cfg = FitConfig(bank=BankConfig(m=8, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(refine_steps=30, refine_lr=1e3, refine_batch=8))
    norm = Normalizer.fit(planted.weights, 64)
    codes = planted.codes / planted.codes.sum(-1, keepdim=True)
    adapters = planted.adapters * planted.codes.sum(-1)[:, None, None] / norm.scales[:, None, None]
    start = (planted.bank.clone(), codes.clone(), adapters.clone())
    with caplog.at_level(logging.WARNING):
        bank, new_codes, new_adapters, history = adam_refine(SolverProblem(planted.weights, norm),
                                                             Factors(planted.bank, codes, 1.0, adapters),
                                                             AdamOptions.from_config(cfg),
                                                             torch.Generator().manual_seed(0))
    assert "refinement diverged" in caplog.text
    assert all(torch.isfinite(t).all() for t in (bank, new_codes, new_adapters))
    assert all(math.isfinite(h) for h in history)
    # the exact planted solution has zero loss: after rolling back, the parameters are (close to) where they started
    assert torch.allclose(bank, start[0], atol=1e-2) and torch.allclose(new_adapters, start[2], rtol=1e-2, atol=1e-2)
