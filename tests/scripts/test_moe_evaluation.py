"""scripts/moe_evaluation.py: the expert-sharing statistics mean what they say on experts of known structure."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.scripts import load_script


def test_identical_experts_share_everything():
    w = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)).expand(5, 4, 6)
    s = load_script("moe_evaluation").layer_sharing(w)
    assert s["mean_abs_cos"] == pytest.approx(1.0) and s["mean_expert_energy"] == pytest.approx(1.0)


def test_orthogonal_experts_share_nothing():
    w = torch.eye(24)[:8].view(8, 4, 6) * torch.arange(1.0, 9.0).view(8, 1, 1)     # disjoint supports
    s = load_script("moe_evaluation").layer_sharing(w)
    assert s["mean_abs_cos"] == pytest.approx(0.0) and s["mean_nearest_abs_cos"] == pytest.approx(0.0)
    assert s["mean_expert_energy"] == pytest.approx(1 / 8)                              # 1/E


def test_copies_plus_noise_sit_in_between():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 16, 16, generator=g)
    w = base.repeat(4, 1, 1) + 0.5 * torch.randn(8, 16, 16, generator=g)        # 2 parents, 4 noisy copies each
    s = load_script("moe_evaluation").layer_sharing(w)
    assert 0.7 < s["mean_nearest_abs_cos"] < 0.9 and s["mean_abs_cos"] < s["mean_nearest_abs_cos"]
    assert 0.3 < s["mean_expert_energy"] < 0.6
