"""Sensitivity weights of the fit's objectives: c_l = probe KL / the objective's own error of the probe's
perturbation, mean 1 over experts; off without a probe or with activation.sensitivity off; a layer the model feels
more gets a lower fitted error."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from globe.calibration.sensitivity import layer_factor, perturbation
from globe.fit.config import ActivationConfig, BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.objectives.activation import ActivationObjective, weighted_sq_norms
from globe.fit.objectives.expert_output import expert_data, expert_losses
from globe.fit.objectives.sensitivity import output_gains
from tests.fit.objectives.test_activation import make_stats
from tests.helpers.planted import make_planted


def probe(kl_gate, kl_up=None, layers=(0, 1, 2, 3)) -> dict:
    return {"format_version": 1, "layers": list(layers), "kl": {"gate": list(kl_gate), "up": list(kl_up or kl_gate)},
            "keep": 0.5, "error": 0.2, "tokens": 64, "seconds": 0.1}


def setup(seed: int = 5):
    planted = make_planted(n=32, p=16, d=20, m=8, r=4, k=2, seed=seed, experts_per_layer=8)
    gen = torch.Generator().manual_seed(seed)
    weights = planted.weights + 0.5 * torch.randn(planted.weights.shape, generator=gen)
    stats = make_stats(4, 8, 20, 16, gen)
    return weights, planted.ids, stats


def test_gains_are_kl_per_unit_of_the_objectives_error_with_mean_one():
    weights, ids, stats = setup()
    stats.info["sensitivity"] = probe([1e-4, 2e-4, 4e-4, 8e-4])
    stack = SimpleNamespace(weights=weights, ids=ids)
    cfg = FitConfig(activation=ActivationConfig(sensitivity_power=1.0))
    aware = ActivationObjective.for_family(stats, "gate", stack, cfg)
    plain = ActivationObjective.for_family(stats, "gate", stack, dataclasses.replace(
        cfg, activation=ActivationConfig(sensitivity=False)))
    assert aware.sensitivity is not None and plain.sensitivity is None
    assert torch.equal(plain.whiten.gains, torch.ones(32))
    # by hand: the objective's normalised error of the probe's perturbation, per layer
    delta = torch.cat([perturbation(weights[ids[:, 0] == l], layer_factor(stats, l)) for l in range(4)])
    err = weighted_sq_norms(delta, plain.whiten, 8) / weights.double().square().mean((1, 2))
    c = torch.tensor([1e-4, 2e-4, 4e-4, 8e-4], dtype=torch.float64) / err.view(4, 8).sum(1)
    expect = (c / c.mean()).repeat_interleave(8)
    assert torch.allclose(aware.whiten.gains.double().square(), expect, rtol=1e-4)
    assert float(aware.whiten.gains.square().mean()) == pytest.approx(1.0, rel=1e-5)
    assert aware.sensitivity["weights"] == pytest.approx((c / c.mean()).tolist(), rel=1e-4)
    # the default power 0.5: the square roots of c, mean 1
    half = ActivationObjective.for_family(stats, "gate", stack, FitConfig())
    assert FitConfig().activation.sensitivity_power == 0.5
    root = c.sqrt() / c.sqrt().mean()
    assert torch.allclose(half.whiten.gains.double().square(), root.repeat_interleave(8), rtol=1e-4)
    # no probe in the statistics: nothing changes
    stats.info.pop("sensitivity")
    assert ActivationObjective.for_family(stats, "gate", stack, cfg).sensitivity is None


def test_the_layer_the_model_feels_gets_the_lower_error():
    weights, ids, stats = setup(seed=7)
    stack = SimpleNamespace(weights=weights, ids=ids)
    cfg = FitConfig(bank=BankConfig(m=4, r=3, init="svd"), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=6, varpro_steps=10), activation=ActivationConfig(steps=60))

    def layer_errors(kl):
        stats.info["sensitivity"] = probe(kl)
        objective = ActivationObjective.for_family(stats, "gate", stack, cfg)
        fam = fit_family(weights, ids, cfg, objective=objective)
        plain = ActivationObjective.for_family(stats, "gate", stack, dataclasses.replace(
            cfg, activation=ActivationConfig(sensitivity=False)))
        err = weighted_sq_norms(weights - fam.reconstruct(), plain.whiten, 8)
        return (err / weighted_sq_norms(weights, plain.whiten, 8)).view(4, 8).sum(1)

    even = layer_errors([1.0, 1.0, 1.0, 1.0])
    felt = layer_errors([1.0, 1.0, 1.0, 100.0])
    assert felt[3] < 0.9 * even[3]                       # the felt layer is fitted better ...
    assert float(felt[:3].mean()) > float(even[:3].mean())   # ... at the others' expense


def test_output_gains_weight_each_layer_by_kl_per_output_error():
    gen = torch.Generator().manual_seed(0)
    n, p, d, s = 8, 6, 10, 12
    ids = torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], 1)
    gate, up = torch.randn(n, p, d, generator=gen), torch.randn(n, p, d, generator=gen)
    down = torch.randn(n, d, p, generator=gen)
    samples = SimpleNamespace(layers=[0, 1], inputs=torch.randn(2, 4, s, d, generator=gen),
                              weights=torch.rand(2, 4, s, generator=gen), counts=torch.full((2, 4), s),
                              info={"activation": "silu"}, layer_index=lambda l: l)
    data = expert_data(samples, ids, gate, up, down, validation=0.25)
    stats = make_stats(2, 4, d, p, gen)
    stats.info["sensitivity"] = probe([1e-4, 1e-4], [1e-4, 1e-4], layers=(0, 1))
    start = expert_losses(data, gate, up)

    def loss(deltas):
        return expert_losses(data, gate + deltas.get("gate", 0), up + deltas.get("up", 0)) - start
    gains, record = output_gains(stats, {"gate": gate, "up": up}, ids, loss)
    err = torch.zeros(2, dtype=torch.float64)              # by hand: each family's perturbation, per layer
    for f, w in (("gate", gate), ("up", up)):
        delta = torch.cat([perturbation(w[ids[:, 0] == l], layer_factor(stats, l)) for l in range(2)])
        err += loss({f: delta}).view(2, 4).sum(1)
    assert torch.allclose(torch.tensor(record["objective_error"], dtype=torch.float64), err, rtol=1e-6)
    expect = (1 / err) / (1 / err).mean()
    assert torch.allclose(gains.double(), expect.repeat_interleave(4), rtol=1e-4)
    weighted = data.weighted(gains)
    assert torch.allclose(weighted.inv_norm, data.inv_norm * gains)
    assert data.weighted(None) is data
