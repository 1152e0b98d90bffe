"""benchmarks/baselines/quant.py: byte counts by hand, and quantizing in an order that lets the adapters absorb the
bank's error (refit) beats quantizing after the fit, on a planted GloBE family."""
from __future__ import annotations

import math

import torch

from benchmarks.baselines.common import by_layer
from benchmarks.baselines.quant import globe_after, globe_bf16, globe_refit, quantized, residual
from globe.core.result import FamilyFit
from globe.quant import QuantConfig

L, E, P, D, M, R = 2, 3, 24, 40, 5, 16


def planted() -> tuple[FamilyFit, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A family W_i = A_i sum_j alpha_ij B_j exactly, experts stored in shuffled order, and correlated inputs."""
    g = torch.Generator().manual_seed(0)
    n = L * E
    bank = torch.randn(M, R, D, generator=g)
    bank /= bank.flatten(1).norm(dim=1)[:, None, None]
    codes = torch.rand(n, M, generator=g) * (torch.rand(n, M, generator=g) > 0.4)
    codes[:, 0] += 0.5
    adapters = torch.randn(n, P, R, generator=g)
    ids = torch.tensor([(layer, e) for layer in range(L) for e in range(E)])[torch.randperm(n, generator=g)]
    fam = FamilyFit("gate", bank, codes, adapters, torch.ones(n), ids)
    mix = torch.randn(L, E, 6, D, generator=g)
    x = torch.randn(L, E, 300, 6, generator=g) @ mix + 0.05 * torch.randn(L, E, 300, D, generator=g)
    grams = x.transpose(-1, -2) @ x                                                    # [L, E, D, D]
    return fam, by_layer(fam.reconstruct(), ids), grams, x


def output_error(w, w_hat, x) -> float:
    return float(((w - w_hat) @ x.transpose(-1, -2)).square().sum() / (w @ x.transpose(-1, -2)).square().sum())


def test_bytes_are_a_hand_count():
    fam, w, grams, _ = planted()
    nnz = int((fam.codes != 0).sum())
    assert globe_bf16(fam).total_bytes == 2 * (M * R * D + L * E * P * R) + 4 * nnz + 2 * L * E
    after = globe_after(fam, QuantConfig(method="rtn", bits=4, group=8))
    hand = math.ceil(M * R * D * 4 / 8) + M * R * math.ceil(D / 8) * 4 \
        + math.ceil(L * E * P * R * 4 / 8) + L * E * P * math.ceil(R / 8) * 4
    assert after.bytes["bank"] + after.bytes["adapters"] == hand
    q = quantized(w, QuantConfig(method="gptq", bits=2, group=16), grams)
    assert q.total_bytes == math.ceil(w.numel() * 2 / 8) + L * E * P * math.ceil(D / 16) * 4
    res = residual(w, after, QuantConfig(method="gptq", bits=2, group=16), grams)
    assert res.total_bytes == after.total_bytes + q.total_bytes


def test_bf16_globe_reconstructs_the_planted_family_in_layer_order():
    fam, w, _, _ = planted()
    assert torch.allclose(globe_bf16(fam).weights, w, rtol=0, atol=0.02 * float(w.abs().max()))


def test_refit_beats_quantizing_after_the_fit():
    fam, w, grams, x = planted()
    moments = grams / 300
    for bits in (3, 4):
        after = globe_after(fam, QuantConfig(method="rtn", bits=bits, group=8))
        refit = globe_refit(fam, w, moments, QuantConfig(method="gptq", bits=bits, group=8))
        assert refit.total_bytes == after.total_bytes
        assert output_error(w, refit.weights, x) < 0.5 * output_error(w, after.weights, x)


def test_residual_quantization_shrinks_the_error_of_its_base():
    fam, w, grams, x = planted()
    base = globe_after(fam, QuantConfig(method="rtn", bits=2, group=8))
    res = residual(w, base, QuantConfig(method="gptq", bits=3, group=16), grams)
    assert output_error(w, res.weights, x) < 0.1 * output_error(w, base.weights, x)
