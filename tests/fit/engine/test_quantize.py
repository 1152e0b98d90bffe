"""The quantize stage: packed bank and adapters, adapters refitted to the quantized bank, error feedback pays."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from globe.errors import ConfigError
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.solvers.quantized import exact_adapters, exact_adapters_moments, quantize_factors
from globe.quant import QuantConfig, quantize
from tests.helpers.planted import make_planted


def quant_cfg(bits: int | None, method: str = "gptq") -> FitConfig:
    return FitConfig(bank=BankConfig(m=8, r=16), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(am_iters=10, varpro_steps=10),
                     quant=QuantSection(bits=bits, group=8, method=method))


def test_quantized_family_holds_packed_parts_equal_to_its_factors():
    planted = make_planted(n=32, p=24, d=32, m=8, r=16, seed=0)
    fam = fit_family(planted.weights, planted.ids, quant_cfg(4))
    assert set(fam.quant) == {"bank", "adapters"}
    assert torch.equal(fam.quant["bank"].dequantize(), fam.bank)
    assert torch.equal(fam.quant["adapters"].dequantize(), fam.adapters)
    assert fam.quant["adapters"].bits == 4 and fam.quant["bank"].group == 8
    recon_err = float((fam.reconstruct() - planted.weights).norm() / planted.weights.norm())
    assert recon_err == pytest.approx(fam.metrics["rel_err"], rel=1e-4)
    assert fam.metrics["rel_err"] >= fam.metrics["rel_err_unquantized"] - 1e-6
    q = fam.metrics["quant"]
    assert q["bytes"]["bank"] == fam.quant["bank"].nbytes and q["bits"] == 4
    assert 0 < q["bits_per_weight"] < 16


def test_unquantized_config_is_unchanged_by_the_section():
    assert "quant" not in FitConfig().to_dict()
    cfg = quant_cfg(3)
    assert FitConfig.from_dict(cfg.to_dict()).quant == cfg.quant
    with pytest.raises(ConfigError, match="quant.bits"):
        dataclasses.replace(cfg, quant=QuantSection(bits=5)).validate()


def test_refit_and_error_feedback_beat_quantizing_after_the_fit():
    """Refitting the adapters to the quantized bank and GPTQ under H = M M^T give a lower error than RTN of both
    factors after the fit (the benchmark's variant (a)): the error added by quantization is smaller."""
    planted = make_planted(n=32, p=24, d=32, m=8, r=16, seed=1)
    fam = fit_family(planted.weights, planted.ids, quant_cfg(None))
    cfg = QuantConfig(method="rtn", bits=3, group=8)
    bank, adapters = quantize(fam.bank, cfg).dequantize(), quantize(fam.adapters, cfg).dequantize()
    after = dataclasses.replace(fam, bank=bank, adapters=adapters).reconstruct()
    floor = float((fam.reconstruct() - planted.weights).square().sum())
    excess_after = float((after - planted.weights).square().sum()) - floor
    out = quantize_factors(planted.weights, fam.codes, fam.bank, fam.phi, QuantConfig(method="gptq", bits=3, group=8))
    excess = float(out.sq_err.sum()) - floor
    assert 0 < excess < 0.8 * excess_after


def test_exact_adapters_forms_agree_and_are_optimal():
    g = torch.Generator().manual_seed(0)
    w, mixed = torch.randn(3, 6, 10, generator=g, dtype=torch.float64), torch.randn(3, 4, 10, generator=g,
                                                                                      dtype=torch.float64)
    lower = torch.randn(3, 10, 10, generator=g, dtype=torch.float64).tril() + 3 * torch.eye(10, dtype=torch.float64)
    a1, g1 = exact_adapters(w @ lower, mixed @ lower, ridge=0.0)
    a2, g2 = exact_adapters_moments(w, mixed, lower @ lower.transpose(1, 2), ridge=0.0)
    assert torch.allclose(a1, a2, atol=1e-8) and torch.allclose(g1, g2, atol=1e-8)
    loss = lambda a: float(((w - a @ mixed) @ lower).square().sum())   # noqa: E731
    assert loss(a1) <= loss(a1 + 1e-3 * torch.randn(a1.shape, generator=g, dtype=torch.float64))


def test_fit_and_compress_flags_set_the_quant_section():
    from globe.cli.main import build_parser
    from globe.cli.fit import build_config
    args = build_parser().parse_args(["fit", "M", "-o", "O", "--bits", "3", "--quant-group", "32",
                                      "--quant-method", "rtn"])
    assert build_config(args).quant == QuantSection(bits=3, group=32, method="rtn")
    assert build_config(build_parser().parse_args(["fit", "M", "-o", "O"])).quant.bits is None


def test_activation_weighted_refit_lowers_the_weighted_error():
    """With calibration statistics (an ActivationObjective) the refit and GPTQ minimise ||(W - W_hat) L_i||: the
    weighted error is below that of the weight-space quantization of the same fit."""
    from globe.fit.engine.quantize import quantize_family
    from globe.fit.objectives.activation import ActivationObjective, Whitener
    planted = make_planted(n=32, p=24, d=32, m=8, r=16, seed=2)
    scale = torch.logspace(-2, 1, 32)                                        # very unequal input channels
    factor = torch.linalg.cholesky(torch.diag(scale) + 0.01 * torch.eye(32))
    whiten = Whitener(factors=factor[None], index=torch.zeros(32, dtype=torch.long), gains=torch.ones(32))
    cfg = quant_cfg(None)
    fam = fit_family(planted.weights, planted.ids, cfg)
    cfg.quant = QuantSection(bits=3, group=8)
    act = quantize_family(planted.weights, fam, cfg, ActivationObjective(whiten))
    plain = quantize_family(planted.weights, fam, cfg, None)
    weighted = lambda f: float(((f.reconstruct() - planted.weights) @ factor).norm())   # noqa: E731
    assert weighted(act) < 0.9 * weighted(plain)
    assert act.metrics["act_rel_err"] == pytest.approx(weighted(act) / float((planted.weights @ factor).norm()),
                                                       rel=1e-3)


@pytest.mark.parametrize("p,r", [(24, 16), (5, 3)])
def test_packed_adapters_do_not_depend_on_the_chunk_size(p, r):
    g = torch.Generator().manual_seed(0)
    w, codes = torch.randn(10, p, 20, generator=g), torch.rand(10, 4, generator=g)
    bank = torch.randn(4, r, 20, generator=g)
    for bits in (2, 3, 4):
        a = quantize_factors(w, codes, bank, "identity", QuantConfig(bits=bits, group=8), chunk=3)
        b = quantize_factors(w, codes, bank, "identity", QuantConfig(bits=bits, group=8), chunk=10)
        assert torch.equal(a.adapters.codes, b.adapters.codes) and torch.equal(a.adapters.scales, b.adapters.scales)
