"""D2-MoE: hand-counted parameters, the Fisher/frequency-weighted base, exact recovery of planted deltas."""
from __future__ import annotations

import torch

from benchmarks.baselines import rel_err
from benchmarks.baselines.d2moe import d2moe, fisher_base


def test_counts_on_a_tiny_shape():
    w = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))    # L=2, E=4, p=6, d=10
    freq = torch.ones(2, 4)
    per = d2moe(w, 0.8, freq)                    # spare 0.8*240 - 60 = 132 -> k = floor(132 / (4*16)) = 2
    assert per.info["rank"] == 2 and per.params == 2 * (60 + 4 * 2 * 16) == 376
    shared = d2moe(w, 0.8, freq, share_v=True)   # k = floor(132 / (4*6 + 10)) = 3
    assert shared.info["rank"] == 3 and shared.params == 2 * (60 + 4 * 6 * 3 + 3 * 10) == 324
    assert max(per.params, shared.params) <= 0.8 * w.numel()


def test_fisher_base_weights_elementwise_by_fisher_times_frequency():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 5, generator=gen)
    assert torch.allclose(fisher_base(w, None, torch.ones(3)), w.mean(0), atol=1e-6)
    fisher = torch.zeros(3, 4, 5)
    fisher[1, :2] = 1.0                          # expert 1 owns the first two rows ...
    fisher[2, 2:] = 1.0                          # ... expert 2 the rest
    base = fisher_base(w, fisher, torch.tensor([5.0, 1.0, 3.0]))
    assert torch.allclose(base[:2], w[1, :2]) and torch.allclose(base[2:], w[2, 2:])
    base = fisher_base(w, torch.ones(3, 4, 5), torch.tensor([0.0, 1.0, 3.0]))
    assert torch.allclose(base, (w[1] + 3 * w[2]) / 4, atol=1e-6)


def test_planted_base_plus_low_rank_deltas_are_recovered():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 1, 16, 24, generator=gen)
    half = torch.randn(1, 3, 16, 2, generator=gen) @ torch.randn(1, 3, 2, 24, generator=gen)
    w = base + torch.cat([half, -half], dim=1)                 # rank-2 deltas that average to zero
    fit = d2moe(w, 0.5, torch.ones(1, 6))                      # rank floor((0.5*6*384 - 384) / 240) = 3 >= 2
    assert fit.info["rank"] >= 2
    assert rel_err(w, fit.weights) < 1e-5
