"""Per-expert SVD and whitened SVD: hand-counted parameters, Eckart-Young, and the whitened objective."""
from __future__ import annotations

import torch

from benchmarks.baselines import rel_err
from benchmarks.baselines.svd import per_expert_svd, whitened_svd, whitener


def test_per_expert_svd_count_and_rank_on_a_tiny_shape():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 4, 6, 10, generator=gen)                  # L=2, E=4, p=6, d=10
    fit = per_expert_svd(w, 0.5)                                  # k = floor(0.5 * 60 / 16) = 1
    assert fit.info["rank"] == 1
    assert fit.params == 8 * 1 * (6 + 10) == 128
    assert fit.params <= 0.5 * w.numel()
    assert int(torch.linalg.matrix_rank(fit.weights[1, 2])) == 1
    s = torch.linalg.svdvals(w.double())                          # Eckart-Young: the tail of the spectrum
    expected = (s[..., 1:].square().sum() / s.square().sum()).sqrt()
    assert abs(rel_err(w, fit.weights) - float(expected)) < 1e-5


def test_whitened_svd_beats_plain_svd_under_the_routed_gram():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1, 3, 8, 12, generator=gen)
    x = torch.randn(1, 3, 200, 12, generator=gen) * torch.logspace(0, 2, 12)   # anisotropic routed tokens
    grams = x.transpose(-1, -2) @ x                               # [L, E, d, d]
    white, plain = whitened_svd(w, grams, 0.45), per_expert_svd(w, 0.45)   # k = floor(0.45 * 96 / 20) = 2
    assert white.params == plain.params == 3 * 2 * (8 + 12)
    out_err = lambda fit: float(((w - fit.weights) @ x.transpose(-1, -2)).norm())
    assert out_err(white) < 0.9 * out_err(plain)
    assert rel_err(w, white.weights) > rel_err(w, plain.weights)  # and pays for it in weight space


def test_whitener_is_a_cholesky_factor_and_its_inverse():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=gen)
    s, s_inv = whitener(x.T @ x)
    assert torch.allclose(s @ s.T, (x.T @ x).double(), atol=1e-8)
    assert torch.allclose(s @ s_inv, torch.eye(6, dtype=torch.float64), atol=1e-10)
