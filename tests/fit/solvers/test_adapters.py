"""Adapter refit: exact least squares via batched Cholesky, error identity, never worse than before."""
from __future__ import annotations

import torch

from globe.fit.solvers.adapters import coding_targets, refit_adapters


def test_refit_is_least_squares_and_error_formula_is_exact():
    gen = torch.Generator().manual_seed(0)
    weights, mixed = torch.randn(9, 12, 20, generator=gen), torch.randn(9, 5, 20, generator=gen)
    fit = refit_adapters(weights, mixed, ridge=1e-10)
    explicit = (weights - fit.adapters @ mixed).square().sum((1, 2))
    assert torch.allclose(fit.sq_err, explicit, rtol=1e-4, atol=1e-4)
    for _ in range(5):                                   # any other adapter does worse (never better)
        other = fit.adapters + 1e-2 * torch.randn(fit.adapters.shape, generator=gen)
        assert bool(((weights - other @ mixed).square().sum((1, 2)) >= explicit - 1e-5).all())
    assert bool((fit.cond >= 1).all())


def test_coding_targets_reproduce_the_projection():
    gen = torch.Generator().manual_seed(1)
    adapters, core = torch.randn(4, 10, 3, generator=gen), torch.randn(4, 3, 8, generator=gen)
    targets = coding_targets(adapters @ core, adapters, ridge=1e-12)
    assert torch.allclose(targets, core, atol=1e-4)
