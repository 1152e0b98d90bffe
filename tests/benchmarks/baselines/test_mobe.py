"""MoBE: hand-counted parameters, the SVD-group start as the original builds it, and that it beats per-expert
SVD on a planted shared-basis problem."""
from __future__ import annotations

import torch

from benchmarks.baselines import rel_err
from benchmarks.baselines.mobe import MobeConfig, fit_mobe, mobe_rank, svd_group_init
from benchmarks.baselines.svd import per_expert_svd


def test_count_on_a_tiny_shape():
    w = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))    # L=2, E=4, p=6, d=10
    fit = fit_mobe(w, 0.5, MobeConfig(m=2, epochs=3))     # r = floor((120 - 8) / (24 + 20)) = 2
    assert fit.info["r"] == 2 and fit.info["m"] == 2
    assert fit.params == 2 * (4 * 6 * 2 + 2 * 2 * 10 + 4 * 2) == 192
    assert fit.params <= 0.5 * w.numel()
    assert mobe_rank(4, 6, 10, 1, 0.5) == 3               # floor((120 - 4) / (24 + 10))


def test_svd_group_start_reconstructs_each_group_and_has_one_hot_logits():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1, 4, 3, 2, generator=gen) @ torch.randn(1, 1, 2, 8, generator=gen)   # rank 2 per expert
    a, b, logits = svd_group_init(w, m=2, r=4)             # groups {0, 1}, {2, 3}: stacked rank <= 4
    assert a.shape == (1, 4, 3, 4) and b.shape == (1, 2, 4, 8) and logits.shape == (1, 4, 2)
    for e, g in enumerate([0, 0, 1, 1]):
        assert torch.allclose(a[0, e] @ b[0, g], w[0, e], atol=1e-5)
        assert logits[0, e].tolist() == [1.0 if i == g else 0.0 for i in range(2)]


def test_mobe_beats_per_expert_svd_on_a_planted_shared_basis():
    gen = torch.Generator().manual_seed(2)
    basis = torch.nn.functional.silu(torch.randn(1, 1, 8, 32, generator=gen))       # one shared act(B)
    w = (torch.randn(2, 8, 16, 8, generator=gen) @ basis) * 0.05                  # W_e = A_e act(B): rank 8
    svd = per_expert_svd(w, 0.5)                                                   # rank 5 < 8 per expert
    mobe = fit_mobe(w, 0.5, MobeConfig(m=2, epochs=400, lr=0.02))                  # r = 10 >= 8 shared
    assert mobe.params <= svd.params + 16 * 8 and mobe.params <= 0.5 * w.numel()
    assert rel_err(w, mobe.weights) < 0.5 * rel_err(w, svd.weights), (rel_err(w, mobe.weights),
                                                                       rel_err(w, svd.weights))


def test_best_state_is_kept_across_layers_independently():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 4, 6, 10, generator=gen)
    one = fit_mobe(w[:1], 0.5, MobeConfig(m=2, epochs=40, check_every=10))
    both = fit_mobe(w, 0.5, MobeConfig(m=2, epochs=40, check_every=10))
    assert torch.allclose(one.weights[0], both.weights[0], atol=1e-4)             # layers do not interact
