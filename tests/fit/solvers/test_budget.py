"""Parameter accounting and the (m, r) budget solver."""
from __future__ import annotations

import pytest
import torch

from globe.errors import ConfigError
from globe.core.params import stored_params
from globe.fit.solvers.budget import candidate_shapes, choose_shape


def test_stored_params_formula_for_qwen15_shapes():
    n, p, d = 24 * 60, 1408, 2048
    assert stored_params(n, p, d, m=256, r=704, nnz=n * 12) == 256 * 704 * 2048 + n * p * 704 + n * 12 + n


@pytest.mark.parametrize("budget", [0.25, 0.35, 0.5])
def test_candidates_fit_the_budget_and_use_it(budget):
    n, p, d, k = 96, 128, 256, 12
    cands = candidate_shapes(n, p, d, budget, k)
    assert cands
    for m, r in cands:
        assert stored_params(n, p, d, m, r, n * k) <= budget * n * p * d
        assert stored_params(n, p, d, m + 1, r, n * k) > budget * n * p * d or m == n * r


def test_choose_shape_prefers_lower_spectral_error_and_rejects_tiny_budgets():
    n, p, d = 16, 8, 16
    flat = torch.ones(n, 8)                              # equal singular values: larger r is better
    m, r = choose_shape(n, p, d, 0.5, 2, flat)
    assert r == max(rr for _, rr in candidate_shapes(n, p, d, 0.5, 2))
    with pytest.raises(ConfigError, match="too small"):
        choose_shape(n, p, d, 0.01, 2, flat)
