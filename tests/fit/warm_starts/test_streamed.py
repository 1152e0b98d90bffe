"""globe.fit.warm_starts (streamed variants): the streamed warm starts compute what the in-memory ones compute on the same (bf16)
targets, and hold no fp32 copy of them."""
from __future__ import annotations

import pytest
import torch

import globe.fit.warm_starts.base as ws
from globe.fit.warm_starts.greedy import ksvd_sweep, residual_atoms, streamed_ksvd_sweep, streamed_residual_atoms
from globe.fit.warm_starts.kmeans import kmeans_atoms, streamed_kmeans_atoms
from globe.fit.warm_starts.svd import svd_atoms
from globe.fit.warm_starts.ts_pca import streamed_ts_pca_atoms, ts_pca_atoms
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.planning.estimate import traced_peak


def targets(n: int = 256, dim: int = 512, seed: int = 0) -> torch.Tensor:
    """bf16 rows [n, dim] near an 8-dimensional subspace."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=gen)
    return (torch.randn(n, 8, generator=gen) @ basis + 0.3 * torch.randn(n, dim, generator=gen)).bfloat16()


def config(init: str) -> FitConfig:
    return FitConfig(bank=BankConfig(m=16, r=4, init=init), sparsity=SparsityConfig(target_support=4),
                     train=TrainConfig(chunk_size=32))


def test_streamed_atoms_equal_the_in_memory_ones():
    x = targets()
    up = x.float()
    options = ws.WarmStartOptions.from_config(config("greedy"))
    start = svd_atoms(x, 8, torch.Generator().manual_seed(1))
    streamed = streamed_residual_atoms(x, start, 16, torch.Generator(), options)
    assert torch.allclose(streamed, residual_atoms(up, start, 16, torch.Generator(), options), atol=1e-5)
    km = streamed_kmeans_atoms(x, 16, torch.Generator().manual_seed(2))
    assert torch.allclose(km, kmeans_atoms(up, 16, torch.Generator().manual_seed(2)), atol=1e-5)
    pca = streamed_ts_pca_atoms(x, 16, torch.Generator())
    assert torch.allclose(pca, ts_pca_atoms(up, 16, torch.Generator()), atol=1e-4)


def test_streamed_ksvd_sweep_matches_up_to_the_bf16_residual():
    x = targets(seed=3)
    cfg = config("hybrid")
    atoms = svd_atoms(x, 16, torch.Generator().manual_seed(0))
    codes, _ = ws.encode(x, atoms, ws.WarmStartOptions.from_config(cfg))
    a1, c1 = streamed_ksvd_sweep(x, atoms, codes)
    a2, c2 = ksvd_sweep(x.float(), atoms, codes)
    assert float((a1 - a2).norm() / a2.norm()) < 1e-2 and float((c1 - c2).norm() / c2.norm()) < 1e-2
    err = float((x.float() - c1 @ a1).norm() / x.float().norm())
    assert err <= float((x.float() - codes @ atoms).norm() / x.float().norm())     # the sweep still improves


@pytest.mark.parametrize("init", ["hybrid", "greedy", "kmeans"])
def test_streamed_warm_start_holds_no_fp32_copy_of_the_targets(init):
    x = targets(n=1024, dim=4096, seed=4).view(1024, 4, 1024)
    fp32_bytes = x.numel() * 4                                              # 16 MiB
    cfg = config(init)
    _, streamed, _ = traced_peak(ws.warm_start, x, 16, cfg, torch.Generator().manual_seed(0))
    _, in_memory, _ = traced_peak(ws.warm_start, x.float(), 16, cfg, torch.Generator().manual_seed(0))
    assert streamed < 0.8 * fp32_bytes < in_memory
