"""Sparse coding: entmax/sparsemax support, NNLS values, temperature control, logits inverse."""
from __future__ import annotations

import pytest
import torch

from globe.fit.solvers.sparse_coding import code_chunk
from globe.fit.config import FitConfig, SparsityConfig
from globe.fit.solvers.linalg import ridge_cholesky
from globe.fit.solvers.sparse_coding import (codes_to_logits, mapping, nnls_on_support, support_sizes, update_temperature,
                                     weighted_nnls)


def unit_atoms(m: int, dim: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(m, dim, generator=torch.Generator().manual_seed(seed))
    return a / a.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("method", ["entmax15", "sparsemax"])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_codes_to_logits_is_an_exact_inverse(method, temperature):
    gen = torch.Generator().manual_seed(1)
    codes = torch.rand(20, 16, generator=gen) * (torch.rand(20, 16, generator=gen) < 0.3)
    codes[:, 0] += 0.1                                   # every row non-empty
    logits, sums = codes_to_logits(codes, temperature, method)
    back = mapping(method)(logits / temperature, dim=-1) * sums[:, None]
    assert torch.allclose(back, codes, atol=1e-6)
    assert torch.equal(back > 1e-7, codes > 0)


@pytest.mark.parametrize("target", [3, 6, 12])
def test_temperature_control_reaches_target_median_support(target):
    atoms = unit_atoms(64, 40)
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(2))
    cfg = FitConfig(sparsity=SparsityConfig(target_support=target, t_init=5.0))
    gram = atoms @ atoms.T
    codes, temp, _ = code_chunk(x @ atoms.T, gram, ridge_cholesky(gram, 1e-6), 5.0, cfg.sparsity, cfg.train.ridge,
                                retries=30)
    assert abs(float(support_sizes(codes).float().median()) - target) <= 1
    assert cfg.sparsity.t_min <= temp <= cfg.sparsity.t_max


def test_temperature_update_direction_and_clamp():
    sp = SparsityConfig(target_support=10, eta=0.5, t_min=0.01, t_max=2.0)
    assert update_temperature(1.0, 20, sp) < 1.0 < update_temperature(1.0, 5, sp)
    assert update_temperature(1.0, 10, sp) == pytest.approx(1.0)
    assert update_temperature(1.9, 0.1, sp) == 2.0 and update_temperature(0.011, 1000, sp) == 0.01


def test_nnls_on_support_satisfies_kkt():
    atoms = unit_atoms(12, 30, seed=3)
    x = torch.randn(50, 30, generator=torch.Generator().manual_seed(4))
    gram, corr = atoms @ atoms.T, x @ atoms.T
    idx = torch.arange(12).expand(50, 12)
    values = nnls_on_support(corr, gram, idx, torch.ones(50, 12, dtype=torch.bool), ridge=0.0, sweeps=12)
    assert values.min() >= 0
    grad = values @ gram - corr                          # gradient of 0.5||x - v A||^2 wrt v
    active = values > 0
    assert grad[active].abs().max() < 1e-4               # stationary on the active set


def test_weighted_nnls_with_identity_weights_matches_plain_nnls():
    atoms = unit_atoms(8, 6 * 5, seed=5)
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(6))
    gram, corr = atoms @ atoms.T, x @ atoms.T
    idx = torch.arange(8).expand(10, 8)
    valid = torch.ones(10, 8, dtype=torch.bool)
    plain = nnls_on_support(corr, gram, idx, valid, ridge=1e-9)
    weighted = weighted_nnls(corr, gram.expand(10, 8, 8), valid, ridge=1e-9)
    assert torch.allclose(plain, weighted, atol=1e-5)
