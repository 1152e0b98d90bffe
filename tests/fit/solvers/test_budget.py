"""Parameter accounting and the (m, r) budget solver."""
from __future__ import annotations

import pytest
import torch

from globe.errors import ConfigError
from globe.core.params import stored_params
from globe.fit.solvers.budget import candidate_shapes, choose_shape, shared_shapes


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


def _over(n, p, d, budget, m, r, k):
    return stored_params(n, p, d, m, r, n * k) > budget * n * p * d


def test_shared_shapes_cap_the_bank_at_twice_the_support_and_still_spend_the_budget():
    n, p, d, budget, k = 48, 256, 160, 0.404, 12       # the mixtral-e8-top2 family at -35 % of all params
    raw = candidate_shapes(n, p, d, budget, k)
    assert max(m for m, _ in raw) > 2 * k                 # unguarded: banks of many more atoms than 2 x support
    shapes = shared_shapes(raw, n, p, d, budget, k)
    assert all(m <= 2 * k for m, _ in shapes)
    assert shapes == [(24, 49)]                           # r solved from m = 24: the largest rank that fits
    assert not _over(n, p, d, budget, 24, 49, k) and _over(n, p, d, budget, 24, 50, k)
    assert shared_shapes(raw, n, p, d, budget, k, k=10 ** 6) == raw   # the guard off: the candidates unchanged


def test_choose_shape_guard_moves_a_many_atom_choice_and_keeps_one_within_the_bound():
    # mixtral-like: a flat expert spectrum, a bank spectrum that rewards atoms: unguarded it picks m=26 r=48
    n, p, d, budget, k = 48, 256, 160, 0.404, 12
    svals = torch.ones(n, 160)
    stacked = {r: torch.linspace(10, 1, n) for r in (1, 4, 7, 24, 48)}      # r = 40 unprobed, as in the fit
    m, r = choose_shape(n, p, d, budget, k, svals, stacked)
    assert (m, r) == (24, 49)
    # the embedded model's default family (budget 0.5): its choice m=15 r=96 is within 2 x 12 and stays
    n, p, d = 96, 128, 256
    assert choose_shape(n, p, d, 0.5, 12, torch.ones(n, 128), {r: torch.ones(n) for r in (1, 5, 16, 48, 80)}) \
        == (15, 96)


def test_choose_shape_given_rank_caps_the_atoms():
    n, p, d, budget, k = 48, 256, 160, 0.404, 12
    assert choose_shape(n, p, d, budget, k, torch.ones(n, 160), rank=16) == (24, 16)
