"""globe.fit.solvers.lean_varpro: its gradient is the reduced objective's, it optimises at least as well as the
torch.optim.LBFGS path, varpro_refine routes large banks to it, and it holds far less memory."""
from __future__ import annotations

import logging

import pytest
import torch

import globe.fit.solvers.varpro as refine
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.planning.estimate import traced_peak
from globe.fit.solvers.lean_varpro import FlatParams, ReducedLoss, lean_varpro
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions


def problem(n=24, p=16, d=32, r=6, m=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=gen)
    codes = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < 0.4)
    codes[:, 0] += 0.1
    weights = torch.randn(n, p, r, generator=gen) @ (codes @ bank.flatten(1)).view(n, r, d) \
        + 0.3 * torch.randn(n, p, d, generator=gen)
    cfg = FitConfig(bank=BankConfig(m=m, r=r), sparsity=SparsityConfig(target_support=3),
                    train=TrainConfig(chunk_size=10, precision="fp32"))
    return weights, Normalizer.fit(weights), bank / bank.flatten(1).norm(dim=1)[:, None, None], codes, cfg


def test_gradient_equals_autograd_of_the_residual_with_adapters_held():
    weights, norm, bank, codes, cfg = problem()
    params = FlatParams(bank, codes, 0.5, "entmax15", learn_gain=False)
    objective = ReducedLoss(SolverProblem(weights, norm), params, VarProOptions.from_config(cfg), 0, weights.shape[0])
    loss = objective()
    ref = FlatParams(bank, codes, 0.5, "entmax15", learn_gain=False)
    total, ref_loss = float(weights[0].numel() * weights.shape[0]), 0.0
    for lo in range(0, weights.shape[0], 10):
        w = norm.chunk(weights, lo, lo + 10)
        mixed = (ref.codes(lo, lo + 10) @ ref.bank.reshape(8, -1)).view(-1, 6, 32)
        with torch.no_grad():
            adapters = refit_adapters(w, mixed, cfg.train.ridge).adapters
        part = (w - adapters @ mixed).square().sum() / total
        part.backward()
        ref_loss += float(part.detach())
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert torch.allclose(params.g, ref.g, rtol=1e-3, atol=1e-7)


def test_lean_path_optimises_as_well_as_torch_lbfgs():
    weights, norm, bank, codes, cfg = problem(seed=1)
    _, _, lean = lean_varpro(SolverProblem(weights, norm), Factors(bank, codes, 0.5),
                             VarProOptions.from_config(cfg, 40))
    _, _, torch_path = refine.varpro_refine(SolverProblem(weights, norm), Factors(bank, codes, 0.5),
                                          VarProOptions.from_config(cfg, 40))
    assert lean[-1] < lean[0] and abs(lean[0] - torch_path[0]) <= 1e-5 * torch_path[0]
    assert lean[-1] <= torch_path[-1] * 1.01


def test_large_banks_are_routed_to_the_lean_path(monkeypatch):
    weights, norm, bank, codes, cfg = problem(seed=2)
    calls = []
    monkeypatch.setattr("globe.fit.solvers.lean_varpro.lean_varpro", lambda *a, **k: calls.append(1) or (bank, codes, [0.0]))
    refine.varpro_refine(SolverProblem(weights, norm), Factors(bank, codes, 0.5), VarProOptions.from_config(cfg, 3))
    assert not calls                                                        # small bank: torch.optim.LBFGS
    monkeypatch.setattr(refine, "LBFGS_HISTORY_BYTES", 1024)
    refine.varpro_refine(SolverProblem(weights, norm), Factors(bank, codes, 0.5), VarProOptions.from_config(cfg, 3))
    assert calls == [1]


def test_lean_path_holds_a_fraction_of_the_memory():
    weights, norm, bank, codes, cfg = problem(n=16, p=8, d=256, r=32, m=64, seed=3)   # bank-dominated
    problem_, start = SolverProblem(weights, norm), Factors(bank, codes, 0.5)
    options = VarProOptions.from_config(cfg, 8)
    _, lean, _ = traced_peak(lean_varpro, problem_, start, options)
    _, full, _ = traced_peak(refine.varpro_refine, problem_, start, options)
    assert lean < 0.5 * full


class _Bar:
    """Stands in for globe.progress.counter: records the label, the budget and the updates."""

    made: list["_Bar"] = []

    def __init__(self, desc, total=None):
        self.desc, self.total, self.n, self.closed = desc, total, 0, False
        _Bar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix = kw

    def close(self):
        self.closed = True


@pytest.mark.parametrize("lean", [False, True])
def test_varpro_shows_one_bar_step_per_evaluation_and_logs_its_label(monkeypatch, caplog, lean):
    import globe.fit.solvers.lean_varpro as lean_mod
    weights, norm, bank, codes, cfg = problem()
    _Bar.made = []
    monkeypatch.setattr(refine, "counter", _Bar)
    monkeypatch.setattr(lean_mod, "counter", _Bar)
    monkeypatch.setattr(refine, "uses_lean_varpro", lambda *a: lean)
    with caplog.at_level(logging.INFO, logger="globe"):
        _, _, history = refine.varpro_refine(SolverProblem(weights, norm), Factors(bank, codes, 0.5),
                                             VarProOptions.from_config(cfg, 6, label="VarPro gate (test)"))
    (bar,) = _Bar.made
    assert bar.desc == "VarPro gate (test)" and bar.n == len(history) and bar.closed
    assert bar.n <= bar.total
    assert any(r.getMessage().startswith("VarPro gate (test)") and "evaluations" in r.getMessage()
               for r in caplog.records)
