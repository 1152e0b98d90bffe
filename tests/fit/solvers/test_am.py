"""Alternating minimisation: with full support every step is an exact block minimiser, so error never rises."""
from __future__ import annotations

import pytest
import torch

from globe.fit.solvers.am import AMOptions, AMState, am_pass
from globe.fit.solvers.problem import SolverProblem
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.solvers.normalize import Normalizer
from tests.helpers.planted import make_planted


@pytest.mark.parametrize("mod", ["weighted", "normal"])
def test_am_runs_with_both_dictionary_updates_and_records_conditioning(mod, device):
    planted = make_planted(n=32, m=8, k=2, seed=1)
    cfg = FitConfig(bank=BankConfig(m=8, r=8), sparsity=SparsityConfig(target_support=2), train=TrainConfig(mod=mod))
    norm = Normalizer.fit(planted.weights)
    bank = torch.randn(8, 8, 48, generator=torch.Generator().manual_seed(1))
    state = AMState(bank=(bank / bank.flatten(1).norm(dim=1)[:, None, None]).to(device),
                    codes=torch.rand(32, 8, generator=torch.Generator().manual_seed(2)).to(device), temperature=0.5)
    stats = [am_pass(SolverProblem(planted.weights, norm), state, AMOptions.from_config(cfg)) for _ in range(6)]
    assert stats[-1]["rel_err"] < stats[0]["rel_err"] and all(s["mod_cond"] >= 1 for s in stats)
    assert (stats[-1]["mod_cg_iters"] > 0) == (mod == "weighted")


def test_am_error_is_monotone_when_support_is_full(device):
    planted = make_planted(n=32, m=4, k=2, seed=0)
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=4, t_init=50.0, t_max=1e3),
                    train=TrainConfig(ridge=1e-9))
    norm = Normalizer.fit(planted.weights)
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(4, 8, 48, generator=gen)
    state = AMState(bank=(bank / bank.flatten(1).norm(dim=1)[:, None, None]).to(device),
                    codes=torch.rand(32, 4, generator=gen).to(device), temperature=50.0)
    problem, options = SolverProblem(planted.weights, norm), AMOptions.from_config(cfg)
    errs = [am_pass(problem, state, options)["rel_err"] for _ in range(8)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_a_resumed_am_bar_counts_from_the_iterations_done(monkeypatch):
    import globe.fit.solvers.am as am
    planted = make_planted(n=16, m=4, k=2, seed=3)
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=4, tol=-1.0))
    norm = Normalizer.fit(planted.weights)
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(4, 8, 48, generator=gen)
    state = AMState(bank=bank / bank.flatten(1).norm(dim=1)[:, None, None], codes=torch.rand(16, 4, generator=gen),
                    temperature=0.5)
    for _ in range(2):
        am_pass(SolverProblem(planted.weights, norm), state, AMOptions.from_config(cfg))   # as if fitted before
        # an interruption
    seen = {}
    real = am.progress

    def recording(iterable, desc, **kw):
        seen.update(kw, desc=desc)
        return real(iterable, desc, **kw)

    monkeypatch.setattr(am, "progress", recording)
    am.run_am(SolverProblem(planted.weights, norm), state, am.AMOptions.from_config(cfg), family="gate")
    assert (seen["desc"], seen["initial"], seen["total"]) == ("AM gate", 2, 4)
    assert state.iteration == 4
