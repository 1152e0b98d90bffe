"""Activation-aware objective: exact weighted adapter refit, C = I reduces to the weight-space fit, whitener
construction from statistics (normalisation, per-expert blend, routing weights), and a lower weighted error."""
from __future__ import annotations

import logging

import pytest
import torch

from globe.calibration import ActivationStats
from globe.errors import ConfigError
from globe.fit.objectives.activation import ActivationObjective, Whitener, build_whitener, weighted_sq_norms
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.config import ActivationConfig, BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.solvers.adapters import FinalizeOptions, finalize
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.varpro import varpro_refine
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions
from tests.helpers.planted import make_planted


def random_spd(k: int, gen: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    return (q * torch.logspace(-spread, 0, k, dtype=torch.float64)) @ q.T


def make_stats(layers: int, experts: int, d: int, p: int, gen: torch.Generator, counts=None) -> ActivationStats:
    tokens = 1000
    hidden = torch.stack([tokens * random_spd(d, gen) for _ in range(layers)])
    counts = counts if counts is not None else torch.randint(1, 50, (layers, experts), generator=gen)
    hidden_expert = torch.stack([torch.stack([random_spd(d, gen) * int(counts[l, e]) for e in range(experts)])
                                 for l in range(layers)])
    inter = torch.stack([torch.stack([random_spd(p, gen) * int(counts[l, e]) for e in range(experts)])
                         for l in range(layers)])
    return ActivationStats(layers=list(range(layers)), hidden=hidden, tokens=tokens, counts=counts,
                           weight_sums=counts.double() / 2, hidden_expert=hidden_expert, intermediate_expert=inter)


def weighted_loss(w, a, mixed, chol):
    return float(((w - a @ mixed) @ chol).square().sum())


def test_weighted_adapter_refit_is_the_closed_form_optimum():
    gen = torch.Generator().manual_seed(0)
    c, p, r, d = 3, 10, 4, 12
    w, mixed = torch.randn(c, p, d, generator=gen), torch.randn(c, r, d, generator=gen)
    cov = random_spd(d, gen)
    chol = torch.linalg.cholesky(cov).float()
    whiten = Whitener(factors=chol[None], index=torch.zeros(c, dtype=torch.long), gains=torch.ones(c))
    adapters = refit_adapters(whiten(w, 0, c), whiten(mixed, 0, c), ridge=0.0).adapters
    cov32 = cov.float()
    closed = w @ cov32 @ mixed.transpose(1, 2) @ torch.linalg.inv(mixed @ cov32 @ mixed.transpose(1, 2))
    assert torch.allclose(adapters, closed, rtol=1e-3, atol=1e-3)
    best = weighted_loss(w, adapters, mixed, chol)
    for _ in range(5):
        delta = 1e-2 * torch.randn(adapters.shape, generator=gen)
        assert weighted_loss(w, adapters + delta, mixed, chol) > best
    # the plain (unweighted) refit is a different, worse adapter for the weighted objective
    plain = refit_adapters(w, mixed, ridge=0.0).adapters
    assert weighted_loss(w, plain, mixed, chol) > best * 1.01


def test_finalize_with_a_whitener_reports_the_weighted_error():
    planted = make_planted(n=16, p=12, d=16, m=4, r=4, seed=1)
    gen = torch.Generator().manual_seed(1)
    noisy = planted.weights + 0.1 * torch.randn(planted.weights.shape, generator=gen)
    norm = Normalizer.fit(noisy)
    chol = torch.linalg.cholesky(random_spd(16, gen)).float()
    whiten = Whitener(factors=chol[None], index=torch.zeros(16, dtype=torch.long), gains=torch.ones(16))
    cfg = FitConfig()
    adapters, codes, sq_err = finalize(SolverProblem(noisy, norm, ActivationObjective(whiten)),
                                       Factors(planted.bank, planted.codes),
                                       FinalizeOptions.from_config(cfg, "identity"))
    recon = norm.fold(adapters) @ (codes @ planted.bank.flatten(1)).view(16, 4, 16)
    direct = ((noisy - recon) @ chol).square().sum((1, 2)).double()
    assert torch.allclose(sq_err, direct, rtol=1e-3)
    assert float(weighted_sq_norms(noisy, whiten, 5).sum()) == pytest.approx(float((noisy @ chol).square().sum()),
                                                                             rel=1e-5)


def test_identity_covariance_reduces_to_the_weight_space_varpro():
    planted = make_planted(n=24, p=12, d=16, m=6, r=4, seed=2)
    gen = torch.Generator().manual_seed(2)
    weights = planted.weights + 0.2 * torch.randn(planted.weights.shape, generator=gen)
    norm = Normalizer.fit(weights)
    cfg = FitConfig(train=TrainConfig(chunk_size=10))
    stats = make_stats(3, 8, 16, 12, gen)
    stats.hidden = 1000 * torch.eye(16, dtype=torch.float64).expand(3, 16, 16).clone() * 7.0   # C = 7 I
    whiten = build_whitener(stats, "gate", planted.ids, 16, damp=0.05)
    codes = planted.codes + 0.1
    options = VarProOptions.from_config(cfg, 15)
    plain = varpro_refine(SolverProblem(weights, norm), Factors(planted.bank, codes, 0.5), options)
    aware = varpro_refine(SolverProblem(weights, norm, ActivationObjective(whiten)), Factors(planted.bank, codes, 0.5),
                          options)
    assert torch.allclose(plain[0], aware[0], atol=1e-4) and torch.allclose(plain[1], aware[1], atol=1e-4)
    assert plain[2] == pytest.approx(aware[2], rel=1e-4)


def test_whitener_normalises_blends_and_weights_by_routing():
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([[0, 10, 30, 40], [5, 5, 5, 25]])
    stats = make_stats(2, 4, 6, 5, gen, counts)
    ids = torch.tensor([[l, e] for l in range(2) for e in range(4)])
    damp = 0.01
    per_layer = build_whitener(stats, "up", ids, 6, damp=damp)
    assert per_layer.factors.shape == (2, 6, 6) and torch.equal(per_layer.gains, torch.ones(8))
    c0 = stats.hidden[0] / stats.tokens
    expect = (c0 / c0.diagonal().mean() + damp * torch.eye(6, dtype=torch.float64)).float()
    got = per_layer.factors[0] @ per_layer.factors[0].T
    assert torch.allclose(got, expect, atol=1e-5)
    per_expert = build_whitener(stats, "gate", ids, 6, per_expert=True, prior_tokens=8.0, damp=damp)
    assert per_expert.factors.shape == (8, 6, 6)
    # an expert never routed falls back to its layer's C
    assert torch.allclose(per_expert.factors[0] @ per_expert.factors[0].T, expect, atol=1e-5)
    down = build_whitener(stats, "down", ids, 5, per_expert=True)
    assert down.factors.shape == (8, 5, 5)
    routed = build_whitener(stats, "gate", ids, 6, routing_weights=True, routing_floor=0.2)
    weights = routed.gains.square().view(2, 4)
    assert torch.allclose(weights.mean(1), torch.ones(2), atol=1e-6)           # mean weight 1 per layer
    assert float(weights[0, 0]) == pytest.approx(0.2) and bool((weights[0].diff() > 0).all())


def test_whitener_rejects_mismatched_statistics():
    gen = torch.Generator().manual_seed(4)
    stats = make_stats(2, 4, 6, 5, gen)
    ids = torch.tensor([[l, e] for l in range(3) for e in range(4)])
    with pytest.raises(ConfigError, match="lack MoE layer"):
        build_whitener(stats, "gate", ids, 6)
    with pytest.raises(ConfigError, match="input dimension 6"):
        build_whitener(stats, "gate", ids[:8], 7)
    stats.hidden_expert = None
    with pytest.raises(ConfigError, match="per-expert statistics"):
        build_whitener(stats, "gate", ids[:8], 6, per_expert=True)


def test_activation_aware_fit_lowers_the_weighted_error(caplog):
    planted = make_planted(n=32, p=16, d=20, m=8, r=4, k=2, seed=5, experts_per_layer=8)
    gen = torch.Generator().manual_seed(5)
    weights = planted.weights + 0.5 * torch.randn(planted.weights.shape, generator=gen)
    stats = make_stats(4, 8, 20, 16, gen)
    whiten = build_whitener(stats, "gate", planted.ids, 20)
    cfg = FitConfig(bank=BankConfig(m=8, r=4, init="svd"), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=8, varpro_steps=20), activation=ActivationConfig(steps=40))
    plain = fit_family(weights, planted.ids, cfg)
    with caplog.at_level(logging.INFO, logger="globe"):
        aware = fit_family(weights, planted.ids, cfg, objective=ActivationObjective(whiten, cfg.activation))
    logged = [r.getMessage() for r in caplog.records]
    # each variable projection says which error it minimises; the final weight error says it is not the objective
    assert any(m.startswith("VarPro gate (activation-weighted error)") for m in logged)
    assert any(m.startswith("VarPro gate (") and "activation" not in m and "evaluations" in m for m in logged)
    assert any("weight rel_err" in m and "not the objective: activation-weighted rel_err" in m for m in logged)
    norms = weighted_sq_norms(weights, whiten, 8).sum()
    plain_act = float(((weights - plain.reconstruct()) @ whiten.factors[whiten.index]).square().sum() / norms) ** 0.5
    assert aware.metrics["act_rel_err"] < 0.9 * plain_act
    recomputed = float(((weights - aware.reconstruct()) @ whiten.factors[whiten.index]).square().sum() / norms) ** 0.5
    assert aware.metrics["act_rel_err"] == pytest.approx(recomputed, rel=1e-3)
    # rel_err stays the weight-space error of the returned factors
    ws = float((weights - aware.reconstruct()).square().sum() / weights.square().sum()) ** 0.5
    assert aware.metrics["rel_err"] == pytest.approx(ws, rel=1e-3)
    assert len(aware.history["activation"]) > 0


def test_identity_covariance_fit_equals_the_weight_space_fit():
    planted = make_planted(n=24, p=12, d=16, m=6, r=4, seed=6)
    gen = torch.Generator().manual_seed(6)
    weights = planted.weights + 0.2 * torch.randn(planted.weights.shape, generator=gen)
    stats = make_stats(3, 8, 16, 12, gen)
    stats.hidden = 1000 * 3.0 * torch.eye(16, dtype=torch.float64).expand(3, 16, 16).clone()     # C = 3 I
    whiten = build_whitener(stats, "gate", planted.ids, 16, damp=3.0)     # L = 2 I: exact in floating point
    assert torch.equal(whiten.factors[0], 2 * torch.eye(16))
    cfg = FitConfig(bank=BankConfig(m=6, r=4, init="svd"), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=5, varpro_steps=10), activation=ActivationConfig(steps=0))
    plain = fit_family(weights, planted.ids, cfg)
    aware = fit_family(weights, planted.ids, cfg, objective=ActivationObjective(whiten, cfg.activation))
    assert torch.allclose(plain.reconstruct(), aware.reconstruct(), atol=1e-5)
    assert aware.metrics["rel_err"] == pytest.approx(plain.metrics["rel_err"], rel=1e-5)
    assert aware.metrics["act_rel_err"] == pytest.approx(plain.metrics["rel_err"], rel=1e-3)


def test_global_whitening_folds_back_into_one_shared_bank():
    gen = torch.Generator().manual_seed(7)
    factors = torch.linalg.cholesky(torch.stack([random_spd(6, gen, 1.0) for _ in range(2)])).float()
    whiten = Whitener(factors=factors, index=torch.tensor([0, 0, 1, 1]), gains=torch.ones(4))
    g = whiten.global_factor()
    mean = (factors[0] @ factors[0].T + factors[1] @ factors[1].T) / 2
    assert torch.allclose(g @ g.T, mean, atol=1e-5)
    from globe.fit.objectives.activation import unwhiten_bank
    bank_w, codes = torch.randn(3, 2, 6, generator=gen), torch.rand(4, 3, generator=gen)
    bank, new_codes = unwhiten_bank(bank_w, codes, g)
    mixed = (new_codes @ bank.flatten(1)).view(4, 2, 6)
    assert torch.allclose(mixed @ g, (codes @ bank_w.flatten(1)).view(4, 2, 6), atol=1e-4)
    assert torch.allclose(bank.flatten(1).norm(dim=1), torch.ones(3))


def test_row_weights_change_the_bank_objective_not_the_optimal_adapter():
    gen = torch.Generator().manual_seed(8)
    n, p, r, d = 4, 6, 3, 8
    weights, mixed = torch.randn(n, p, d, generator=gen), torch.randn(n, r, d, generator=gen)
    chol = torch.linalg.cholesky(random_spd(d, gen, 2.0)).float()
    rows = torch.rand(n, p, generator=gen) + 0.1
    whiten = Whitener(factors=chol[None], index=torch.zeros(n, dtype=torch.long), gains=torch.ones(n), rows=rows)
    scaled = whiten.scale_rows(weights, 3)
    assert torch.allclose(scaled, rows[:, :, None] * weights)
    plain = refit_adapters(whiten(weights, 0, n), whiten(mixed, 0, n), 0.0).adapters
    via_rows = refit_adapters(whiten(scaled, 0, n), whiten(mixed, 0, n), 0.0).adapters / rows[:, :, None]
    assert torch.allclose(plain, via_rows, rtol=1e-4, atol=1e-5)


def test_channel_rows_are_normalised_and_blended():
    gen = torch.Generator().manual_seed(9)
    counts = torch.tensor([[0, 100, 100, 100]])
    stats = make_stats(1, 4, 6, 5, gen, counts)
    stats.gate_channels = torch.rand(1, 4, 5, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, e] for e in range(4)])
    rows = build_whitener(stats, "gate", ids, 6, prior_tokens=10.0, channel_weights=True).rows
    assert torch.allclose(rows[0], torch.ones(5))                                  # never routed: uniform
    assert torch.allclose(rows[1:].square().mean(1), torch.ones(3), atol=1e-5)    # mean weight 1 per expert
    energy = stats.gate_channels[0, 1]
    assert torch.equal(rows[1].argsort(), energy.argsort())
    assert build_whitener(stats, "down", ids, 5, per_expert=True, channel_weights=True).rows is None
    stats.up_channels = None
    with pytest.raises(ConfigError, match="channel sums"):
        build_whitener(stats, "up", ids, 6, channel_weights=True)
