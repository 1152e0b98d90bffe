"""End-to-end properties of fit_family / fit_model: planted recovery, determinism, budgets, warm starts."""
from __future__ import annotations

import math

import pytest
import torch

from globe.errors import ConfigError, NumericalError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family, fit_model
from tests.helpers.fits import on_device
from tests.helpers.planted import make_planted, same_support_up_to_permutation


def planted_config(init: str = "kmeans", support: int = 1, **train) -> FitConfig:
    return FitConfig(bank=BankConfig(m=8, r=8, init=init), sparsity=SparsityConfig(target_support=support),
                     train=TrainConfig(am_iters=40, tol=-1.0, varpro_steps=100, **train))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_bank_is_recovered(seed, device):
    planted = make_planted(k=1, seed=seed)
    fam = fit_family(planted.weights, planted.ids, on_device(planted_config(), device))
    assert fam.metrics["rel_err"] < 1e-3
    assert same_support_up_to_permutation(fam.codes, planted.codes)
    recon = fam.reconstruct()
    assert float((recon - planted.weights).norm() / planted.weights.norm()) < 1e-3


def test_same_seed_gives_bit_identical_bank(device):
    planted = make_planted(n=48, seed=3)
    cfg = planted_config(init="hybrid", support=2)
    cfg.train.am_iters, cfg.train.varpro_steps = 5, 10
    a = fit_family(planted.weights, planted.ids, on_device(cfg, device))
    b = fit_family(planted.weights, planted.ids, on_device(cfg, device))
    assert torch.equal(a.bank, b.bank) and torch.equal(a.codes, b.codes) and torch.equal(a.adapters, b.adapters)


@pytest.mark.parametrize("init", ["svd", "ts_pca", "kmeans", "greedy", "hybrid"])
def test_every_warm_start_fits_and_meets_the_target_support(init, device):
    planted = make_planted(n=64, m=16, k=3, seed=1)
    cfg = FitConfig(bank=BankConfig(m=16, r=8, init=init), sparsity=SparsityConfig(target_support=3),
                    train=TrainConfig(am_iters=15, varpro_steps=0))
    fam = fit_family(planted.weights, planted.ids, on_device(cfg, device))
    assert abs(fam.metrics["median_support"] - 3) <= 1
    # far better than an empty model, and the AM history never reports an error worse than its start by > 5 %
    errs = [h["rel_err"] for h in fam.history["am"]]
    assert fam.metrics["rel_err"] < 0.6 and min(errs) <= errs[0]
    assert fam.codes.min() >= 0 and torch.allclose(fam.codes.sum(1), torch.ones(64), atol=1e-5)


def test_scale_fold_back_reconstructs_original_space(device):
    planted = make_planted(n=32, k=1, seed=2)
    scales = torch.logspace(-3, 2, 32)
    weights = planted.weights * scales[:, None, None]
    cfg = planted_config()
    cfg.train.am_iters, cfg.train.varpro_steps = 10, 20
    fam = fit_family(weights, planted.ids, on_device(cfg, device))
    recon = fam.reconstruct()
    err = ((recon - weights).flatten(1).norm(dim=1) ** 2).sum() / (weights.flatten(1).norm(dim=1) ** 2).sum()
    assert float(err.sqrt()) == pytest.approx(fam.metrics["rel_err"], rel=1e-3, abs=1e-6)
    assert torch.allclose(fam.scales, (weights.flatten(1).square().mean(1)).sqrt(), rtol=1e-5)


def test_nan_weights_raise_naming_the_expert(device):
    planted = make_planted(n=16)
    planted.weights[5, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="layer 0 expert 5"):
        fit_family(planted.weights, planted.ids, on_device(planted_config(), device))


def test_budget_is_respected_and_metrics_are_complete(device):
    planted = make_planted(n=64, p=32, d=64, m=8, r=8, k=2, seed=4)
    cfg = FitConfig(bank=BankConfig(budget=0.4), sparsity=SparsityConfig(target_support=3),
                    train=TrainConfig(am_iters=5, varpro_steps=10))
    fam = fit_family(planted.weights, planted.ids, on_device(cfg, device))
    params = fam.metrics["params"]
    assert params["stored"] <= 0.4 * params["dense"]
    assert params["stored"] == params["bank"] + params["adapters"] + params["codes_nnz"] + params["scales"]
    for key in ("rel_err", "energy_captured", "rel_err_per_layer", "rel_err_per_expert", "bank_effective_rank",
                "coherence", "median_support", "code_entropy", "atom_popularity", "timings", "peak_mem_mb"):
        assert key in fam.metrics
    assert len(fam.metrics["rel_err_per_layer"]) == 8 and len(fam.metrics["atom_popularity"]) == fam.shape["m"]


def test_target_support_larger_than_bank_is_rejected(device):
    planted = make_planted(n=16)
    cfg = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=6))
    with pytest.raises(ConfigError, match="target_support"):
        fit_family(planted.weights, planted.ids, on_device(cfg, device))


def test_fit_model_on_a_tiny_checkpoint(tiny_checkpoint, device):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    cfg = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=5))
    result = fit_model(path, on_device(cfg, device))
    assert set(result.families) == {"gate", "up"}
    inv = result.source["inventory"]
    for fam in result.families.values():
        assert fam.adapters.shape == (len(inv["moe_layers"]) * inv["num_experts"], inv["p"], 4)
        assert 0 < fam.metrics["rel_err"] < 1
    assert result.params["dense_gate"] == inv["params"]["gate"]


@pytest.mark.parametrize("phi, amp, checkpointing", [("silu", "bf16", True), ("tanh", "fp16", False),
                                                     ("identity", "none", False)])
def test_adam_refinement_with_phi_and_amp_never_returns_a_worse_fit(phi, amp, checkpointing, device):
    planted = make_planted(n=32, k=2, seed=5)
    weights = planted.weights + 0.05 * torch.randn(planted.weights.shape, generator=torch.Generator().manual_seed(0))
    base = FitConfig(bank=BankConfig(m=8, r=8, phi=phi), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(am_iters=10, varpro_steps=20))
    refined = FitConfig.from_dict(base.to_dict())
    refined.train.refine_steps, refined.train.amp, refined.train.grad_checkpoint = 30, amp, checkpointing
    a = fit_family(weights, planted.ids, on_device(base, device))
    b = fit_family(weights, planted.ids, on_device(refined, device))
    assert len(b.history["refine"]) == 30 and all(map(math.isfinite, b.history["refine"]))
    assert b.metrics["rel_err"] <= a.metrics["rel_err"] + 1e-9
    assert b.phi == phi and b.metrics["rel_err"] < 1


def test_a_second_am_varpro_cycle_never_makes_the_fit_worse(device):
    planted = make_planted(n=48, k=2, seed=6)
    weights = planted.weights + 0.05 * torch.randn(planted.weights.shape, generator=torch.Generator().manual_seed(1))
    one = FitConfig(bank=BankConfig(m=8, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=8, varpro_steps=20))
    two = FitConfig.from_dict(one.to_dict())
    two.train.cycles = 2
    a = fit_family(weights, planted.ids, on_device(one, device))
    b = fit_family(weights, planted.ids, on_device(two, device))
    assert b.metrics["rel_err"] <= a.metrics["rel_err"] + 1e-6
    assert len(b.history["am"]) > len(a.history["am"]) and len(b.history["varpro"]) > len(a.history["varpro"])
