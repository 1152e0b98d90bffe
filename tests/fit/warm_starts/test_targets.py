"""Tests of globe.fit.warm_starts.targets (and base)'s large-family paths: bf16 target storage, randomised top-r, chunked products."""
from __future__ import annotations

import pytest
import torch

import globe.fit.warm_starts.targets as ws
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.solvers.normalize import Normalizer
from globe.fit.warm_starts.base import WarmStartOptions, encode, rows_mm, rows_tmm, warm_start
from globe.fit.warm_starts.targets import aligned_targets, top_r
from tests.helpers.planted import make_planted


def _noisy_planted(seed: int = 0) -> torch.Tensor:
    planted = make_planted(n=48, p=32, d=48, m=8, r=8, k=2, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return planted.weights + 0.1 * torch.randn(planted.weights.shape, generator=gen)


def _reference_targets(weights: torch.Tensor, norm: Normalizer, r: int, chunk: int) -> torch.Tensor:
    """The two-pass implementation aligned_targets replaced (covariance pass, then SVD + Procrustes pass)."""
    n, _, d = weights.shape
    cov = torch.zeros(d, d, dtype=torch.float64)
    for lo in range(0, n, chunk):
        w = norm.chunk(weights, lo, min(lo + chunk, n))
        cov += torch.einsum("cpd,cpe->de", w, w).double()
    ref = torch.linalg.eigh(cov).eigenvectors[:, -r:].flip(-1).T.float()
    out = torch.empty(n, r, d)
    for lo in range(0, n, chunk):
        w = norm.chunk(weights, lo, min(lo + chunk, n))
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        t0 = s[:, :r, None] * vh[:, :r]
        u, _, v2 = torch.linalg.svd(ref @ t0.transpose(1, 2))
        out[lo:lo + w.shape[0]] = (u @ v2) @ t0
    return out


def test_one_pass_targets_equal_the_two_pass_reference():
    weights = _noisy_planted()
    norm = Normalizer.fit(weights)
    got, want = aligned_targets(weights, norm, 8, chunk=16), _reference_targets(weights, norm, 8, chunk=16)
    assert got.dtype == torch.float32
    # equal to fp32 rounding (the stored factors are contiguous, the reference's are not: other BLAS paths)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_bf16_targets_stay_close_to_fp32(monkeypatch):
    weights = _noisy_planted(1)
    norm = Normalizer.fit(weights)
    full = aligned_targets(weights, norm, 8, chunk=16)
    monkeypatch.setattr(ws, "LARGE_TARGETS_BYTES", 1024)                # force the large-family storage
    half = aligned_targets(weights, norm, 8, chunk=16)
    assert half.dtype == torch.bfloat16
    assert float((half.float() - full).norm() / full.norm()) < 1e-2


def test_randomised_top_r_is_near_the_svd_optimum(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, 200, generator=gen) * (torch.arange(200) + 1.0).rsqrt()     # decaying spectrum
    w = w @ torch.linalg.qr(torch.randn(200, 200, generator=gen)).Q
    exact = top_r(w, 12)                                                    # small matrix: full SVD
    monkeypatch.setattr(ws, "LARGE_MATRIX", 16)
    approx = top_r(w, 12)
    # energy captured by the randomised rank-12 factor is within 1 % of the optimum, and it lies in W's row space
    assert float(approx.square().sum()) >= 0.99 * float(exact.square().sum())
    assert float(approx.square().sum()) <= float(exact.square().sum()) * (1 + 1e-4)


def test_randomised_top_r_draws_from_the_given_seed(monkeypatch):
    """The range finder is seeded by train.seed (passed as `seed`): same seed, same bits; another seed, another
    (equally good) probe."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 64, 200, generator=gen) * (torch.arange(200) + 1.0).rsqrt()
    monkeypatch.setattr(ws, "LARGE_MATRIX", 16)
    assert torch.equal(top_r(w, 12, seed=3), top_r(w, 12, seed=3))
    assert not torch.equal(top_r(w, 12, seed=3), top_r(w, 12, seed=4))


def test_chunked_products_match_plain_ones():
    gen = torch.Generator().manual_seed(0)
    x, y, q = torch.randn(300, 40, generator=gen), torch.randn(40, 5, generator=gen), torch.randn(300, 6, generator=gen)
    xb = x.bfloat16()
    assert torch.equal(rows_mm(x, y), x @ y) and torch.equal(rows_tmm(x, q), x.T @ q)
    assert torch.allclose(rows_mm(xb, y, chunk=64), xb.float() @ y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(rows_tmm(xb, q, chunk=64), xb.float().T @ q, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("init", ["svd", "ts_pca", "kmeans", "greedy", "hybrid"])
def test_warm_start_from_bf16_targets_is_as_good(init):
    weights = _noisy_planted(2)
    norm = Normalizer.fit(weights)
    targets = aligned_targets(weights, norm, 8, chunk=16)
    cfg = FitConfig(bank=BankConfig(m=8, r=8, init=init), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(chunk_size=16))
    x = targets.reshape(targets.shape[0], -1)

    def err(bank):
        atoms = bank.reshape(bank.shape[0], -1)
        atoms = atoms / atoms.norm(dim=1, keepdim=True)
        codes, _ = encode(x, atoms, WarmStartOptions.from_config(cfg))
        return float((x - codes @ atoms).norm() / x.norm())

    full = warm_start(targets, 8, cfg, torch.Generator().manual_seed(0))[0]
    half = warm_start(targets.bfloat16(), 8, cfg, torch.Generator().manual_seed(0))[0]
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert err(half) <= err(full) * 1.05 + 1e-3


class _CountingReads:
    """Tensor-like [N, p, d] that counts how many experts were read (like a lazy reader would)."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights, self.shape, self.dtype, self.read = weights, weights.shape, weights.dtype, 0

    def __getitem__(self, key):
        out = self.weights[key]
        self.read += out.shape[0]
        return out


def test_shared_factors_give_the_aligned_targets():
    weights = _noisy_planted(5)
    norm = Normalizer.fit(weights)
    svals, factors, cov = ws.expert_factors(weights, norm, 12, chunk=16)
    assert svals.shape == (48, 32) and factors.shape == (48, 12, 48)
    for r in (4, 8, 12):
        want = aligned_targets(weights, norm, r, chunk=16)
        got = ws.align_factors(factors, cov, r, chunk=16)
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_budget_solver_reads_and_decomposes_the_family_once():
    from globe.fit.engine import fit_family
    weights = _noisy_planted(6)
    counting = _CountingReads(weights)
    cfg = FitConfig(bank=BankConfig(budget=0.5), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=0, varpro_steps=0, chunk_size=16))
    fam = fit_family(counting, torch.zeros(48, 2, dtype=torch.long), cfg)
    assert 0 < fam.shape["r"] <= 32 and fam.shape["m"] >= 2
    # normalize + shape solver (every probed rank and the warm start share its SVDs) + best-state check + finalize
    assert counting.read == 4 * 48
