"""Shared helpers of the baselines: the layer reshape and the relative error."""
from __future__ import annotations

import torch

from benchmarks.baselines import rel_err
from benchmarks.baselines.common import by_layer


def test_by_layer_orders_experts_by_layer_then_index():
    w = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 2, 3)
    ids = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 2], [0, 1], [1, 2]])
    out = by_layer(w, ids)                                          # [L=2, E=3, 2, 3]
    assert out.shape == (2, 3, 2, 3)
    assert out[:, :, 0, 0].tolist() == [[1, 4, 3], [2, 0, 5]]


def test_rel_err_is_the_relative_frobenius_norm():
    a = torch.ones(1, 2, 2, 2)
    assert rel_err(a, torch.zeros_like(a)) == 1.0
    assert abs(rel_err(a, 0.5 * a) - 0.5) < 1e-12
