"""The experts' Fisher information: squared gradients averaged over calibration windows."""
from __future__ import annotations

import torch

from benchmarks.baselines.checkpoint import load_causal_lm
from benchmarks.baselines.fisher import expert_fisher
from globe.assets import DEFAULT_MODEL_DIR


def test_fisher_is_the_mean_of_the_per_window_squared_gradients():
    model = load_causal_lm(DEFAULT_MODEL_DIR, torch.float32)
    ids = torch.randint(1, 4096, (40,), generator=torch.Generator().manual_seed(0))
    both = expert_fisher(model, ids, window=16, batches=2)                 # windows [0:17] and [16:33]
    first = expert_fisher(model, ids[:17], window=16, batches=1)
    second = expert_fisher(model, ids[16:33], window=16, batches=1)
    assert both["gate"].shape == both["up"].shape == (6, 16, 128, 256)
    for f in ("gate", "up"):
        assert torch.allclose(both[f], (first[f] + second[f]) / 2, rtol=1e-4, atol=1e-12)
        assert (both[f] >= 0).all() and both[f].sum() > 0
    assert (first["gate"].flatten(2).sum(-1) == 0).any()                   # unrouted experts get no gradient
