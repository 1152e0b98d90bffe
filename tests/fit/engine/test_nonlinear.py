"""The nonlinear stage inside fit_family: starts at the linear fit, never ends above it, keeps the supports."""
from __future__ import annotations

import torch

from globe.fit.config import BankConfig, FitConfig, NonlinearConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.engine.nonlinear import nonlinear_applies
from globe.fit.objectives.weights import WeightSpace



class _NotNonlinear(WeightSpace):
    """An objective the nonlinear stages do not support (as the activation-aware one)."""
    name, nonlinear_ok = "not_nonlinear", False

def _tanh_stack(n=24, p=12, d=16, m=4, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=g) * 0.7
    codes = torch.softmax(3 * torch.randn(n, m, generator=g), -1)
    w = torch.randn(n, p, r, generator=g) @ torch.tanh((codes @ bank.reshape(m, -1)).view(n, r, d))
    ids = torch.stack([torch.arange(n) // 8, torch.arange(n) % 8], 1)
    return w, ids


def _cfg(enabled: bool) -> FitConfig:
    return FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(am_iters=10, varpro_steps=20),
                     nonlinear=NonlinearConfig(enabled=enabled, start="am", steps=150, lr=0.03, eval_every=5))


def test_nonlinear_stage_lowers_the_error_of_a_tanh_mixture_at_equal_params():
    w, ids = _tanh_stack()
    linear = fit_family(w, ids, _cfg(False))
    refined = fit_family(w, ids, _cfg(True))
    assert linear.phi == "identity" and refined.phi == "tanh"
    assert refined.metrics["rel_err"] < 0.9 * linear.metrics["rel_err"]
    assert refined.param_count()["stored"] <= linear.param_count()["stored"]        # supports kept
    assert bool(((refined.codes != 0) <= (linear.codes != 0)).all())
    recon = refined.reconstruct()
    direct = float((recon - w).norm() / w.norm())
    assert abs(direct - refined.metrics["rel_err"]) < 1e-3                           # metrics match the tensors
    assert "nonlinear" in refined.history and "nonlinear" in refined.metrics["timings"]


def test_nonlinear_stage_is_skipped_where_unsupported():
    cfg = _cfg(True)
    assert nonlinear_applies(cfg)
    assert not nonlinear_applies(cfg, world=2)
    assert not nonlinear_applies(cfg, objective=_NotNonlinear())
    cfg.train.refine_steps = 5
    assert not nonlinear_applies(cfg)
    assert not nonlinear_applies(_cfg(False))


def test_groups_start_meets_the_budget_and_beats_the_linear_fit_of_near_orthogonal_experts():
    g = torch.Generator().manual_seed(5)
    n_layers, e, p, d = 2, 8, 12, 20
    u = torch.linalg.qr(torch.randn(n_layers * e, p, p, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n_layers * e, d, p, generator=g))[0]
    w = (u * torch.arange(1, p + 1).float() ** -0.7) @ v.transpose(1, 2)          # [N, p, d] random spectra
    ids = torch.stack([torch.arange(n_layers * e) // e, torch.arange(n_layers * e) % e], 1)
    cfg = FitConfig(bank=BankConfig(budget=0.5), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=10, varpro_steps=20),
                    nonlinear=NonlinearConfig(enabled=True, start="groups", steps=100, eval_every=5))
    fam = fit_family(w, ids, cfg)
    assert fam.phi == "tanh" and fam.shape["m"] == 2 * n_layers                     # e / 4 atoms per layer
    counts = fam.param_count()
    assert counts["stored"] <= 0.5 * counts["dense"]
    assert abs(float((fam.reconstruct() - w).norm() / w.norm()) - fam.metrics["rel_err"]) < 1e-3
    cfg.nonlinear.enabled = False
    linear = fit_family(w, ids, cfg)
    assert linear.param_count()["stored"] <= 0.5 * counts["dense"]
    assert fam.metrics["rel_err"] < linear.metrics["rel_err"]
