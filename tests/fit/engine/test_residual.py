"""Quantized residuals: W_hat_i + dequant(R_i), packed like the factors; they lower the weight error."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from globe.errors import ConfigError
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.quant import QuantConfig, quantize
from globe.quant.tensor import concat_rows
from tests.helpers.planted import make_planted


def residual_cfg(residual_bits: int | None, bits: int = 4) -> FitConfig:
    return FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(am_iters=5, varpro_steps=5),
                     quant=QuantSection(bits=bits, group=8, residual_bits=residual_bits, residual_group=16))


@pytest.fixture(scope="module")
def planted():
    return make_planted(n=24, p=24, d=32, m=8, r=16, seed=3)


@pytest.fixture(scope="module")
def fits(planted):
    return {b: fit_family(planted.weights, planted.ids, residual_cfg(b)) for b in (None, 3)}


def test_residual_lowers_the_weight_error_and_is_what_the_family_reconstructs(planted, fits):
    plain, fam = fits[None], fits[3]
    assert "residual" not in plain.quant and set(fam.quant) == {"bank", "adapters", "residual"}
    res = fam.quant["residual"]
    assert res.shape == tuple(planted.weights.shape) and res.bits == 3 and res.group == 16
    recon = float((fam.reconstruct() - planted.weights).norm() / planted.weights.norm())
    assert recon == pytest.approx(fam.metrics["rel_err"], rel=1e-4)
    assert fam.metrics["rel_err_factors"] == pytest.approx(plain.metrics["rel_err"], rel=1e-6)
    assert fam.metrics["rel_err"] < 0.6 * plain.metrics["rel_err"]
    base = dataclasses.replace(fam, quant={k: v for k, v in fam.quant.items() if k != "residual"})
    assert torch.equal(fam.reconstruct(), base.reconstruct() + res.dequantize())
    q = fam.metrics["quant"]
    assert q["bytes"]["residual"] == res.nbytes == (24 * 24 * 32 * 3) // 8 + 2 * 2 * 24 * 24 * 2
    assert q["residual"] == {"bits": 3, "group": 16, "method": "rtn"}
    assert q["bits_per_weight"] > plain.metrics["quant"]["bits_per_weight"] + 3


def test_residual_rows_and_concatenation_are_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, 10, generator=g)
    for bits in (2, 3, 4, 8):
        qt = quantize(w, QuantConfig(method="rtn", bits=bits, group=4))
        rows = torch.tensor([4, 1])
        assert torch.equal(qt.rows(rows), qt.dequantize()[rows])
        parts = [quantize(w[:2], QuantConfig(method="rtn", bits=bits, group=4)),
                 quantize(w[2:], QuantConfig(method="rtn", bits=bits, group=4))]
        joined = concat_rows(parts)
        assert torch.equal(joined.codes, qt.codes) and torch.equal(joined.dequantize(), qt.dequantize())


def test_residual_settings_are_checked():
    with pytest.raises(ConfigError, match="residual_bits"):
        dataclasses.replace(residual_cfg(3), quant=QuantSection(bits=4, residual_bits=5)).validate()
    with pytest.raises(ConfigError, match="needs quantized factors"):
        dataclasses.replace(residual_cfg(3), quant=QuantSection(residual_bits=3)).validate()
    cfg = residual_cfg(2)
    assert FitConfig.from_dict(cfg.to_dict()).quant == cfg.quant
    assert "residual_bits" not in dataclasses.replace(cfg, quant=QuantSection(bits=4)).to_dict()["quant"]


def test_budget_zero_is_plain_quantization_of_the_experts(planted):
    """No low-rank part: the family reconstructs to exactly the experts' own quantization (RTN here, no statistics),
    and it costs exactly those packed residuals: no base (one atom of rank 0: an empty bank and empty adapters), no
    code."""
    cfg = dataclasses.replace(residual_cfg(3), bank=BankConfig(budget=0.0))
    fam = fit_family(planted.weights, planted.ids, cfg)
    assert fam.bank.shape == (1, 0, 32) and fam.adapters.shape == (24, 24, 0) and not fam.codes.any()
    direct = quantize(planted.weights, QuantConfig(method="rtn", bits=3, group=16))
    assert torch.equal(fam.quant["residual"].codes, direct.codes)
    assert torch.equal(fam.reconstruct(), direct.dequantize())
    q = fam.metrics["quant"]
    assert q["bytes"]["residual"] == direct.nbytes
    assert q["bits_per_weight"] - 8 * direct.nbytes / planted.weights.numel() < (3 + 32 + 64) / 32
    assert sum(q["bytes"].values()) == direct.nbytes
    # by hand: exactly per-expert quantization (the compressed checkpoint stores no code, scale or id for it)
    with pytest.raises(ConfigError, match="bank.budget"):
        dataclasses.replace(cfg, quant=QuantSection(bits=4)).validate()


def test_a_plain_family_is_not_reported_short_of_its_support_target(planted):
    """Plain quantization has no codes at all: no support warning (a real low-rank family short of it still is)."""
    from globe.core.result import FitResult
    from globe.run.fit import warn_support
    cfg = dataclasses.replace(residual_cfg(3), bank=BankConfig(budget=0.0))
    plain = fit_family(planted.weights, planted.ids, cfg)
    assert plain.metrics["median_support"] < cfg.sparsity.target_support - 0.5
    short = dataclasses.replace(plain, bank=torch.zeros(2, 3, plain.bank.shape[2]))   # the same metrics, rank 3
    assert warn_support(FitResult(families={"gate": plain}, config=cfg)) == []
    assert warn_support(FitResult(families={"gate": short}, config=cfg)) == ["gate"]


def test_plain_gptq_runs_under_the_undamped_routed_hessian_as_per_expert_gptq_does():
    """With statistics, a plain family's residuals are GPTQ of each expert under its routed second moment
    (S_e + 64 C_l) / (n_e + 64) (scale is irrelevant to GPTQ), damped only by GPTQ itself: the same codes as
    per-expert GPTQ under H_e = S_e + 64 C_l (benchmarks/bytes.py). Before, the objective's ridge (damp 0.01 on the
    normalised C) was damped again by GPTQ: 1.14x the KL on upcycled-qwen2moe at 4-bit group 64."""
    from globe.fit.config import ActivationConfig
    from globe.fit.objectives.activation import ActivationObjective, build_whitener, second_moments
    from tests.fit.objectives.test_activation import make_stats
    planted = make_planted(n=32, p=16, d=20, m=8, r=4, k=2, seed=5, experts_per_layer=8)
    gen = torch.Generator().manual_seed(5)
    weights = planted.weights + 0.5 * torch.randn(planted.weights.shape, generator=gen)
    stats = make_stats(4, 8, 20, 16, gen)
    cfg = FitConfig(bank=BankConfig(budget=0.0), activation=ActivationConfig(),
                    quant=QuantSection(bits=4, group=8, residual_bits=3, residual_group=8))
    objective = ActivationObjective(build_whitener(stats, "gate", planted.ids, 20, per_expert=True, damp=0.01),
                                    cfg.activation)
    fam = fit_family(weights, planted.ids, cfg, objective=objective)
    moments = second_moments(stats, "gate", True, 64.0)                                 # [L, E, d, d]
    h = moments[planted.ids[:, 0], planted.ids[:, 1]] * (stats.counts[planted.ids[:, 0], planted.ids[:, 1]]
                                                         .double() + 64)[:, None, None]
    direct = quantize(weights, QuantConfig(method="gptq", bits=3, group=8), h)
    same = (fam.quant["residual"].integer_codes() == direct.integer_codes()).double().mean()
    assert same > 0.999, float(same)
    damped = quantize(weights, QuantConfig(method="gptq", bits=3, group=8),
                      h / h.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] + 0.01 * torch.eye(20))
    assert (damped.integer_codes() != direct.integer_codes()).any()            # the old Hessian: other codes
