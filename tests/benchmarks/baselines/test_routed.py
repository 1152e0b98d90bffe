"""The routed-experts output used for the output error equals the model's own experts module."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baselines.checkpoint import load_causal_lm, read_families
from benchmarks.baselines.fisher import fused_experts
from benchmarks.baselines.routed import Routed, output_error, routed_output
from globe.assets import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def model():
    return load_causal_lm(DEFAULT_MODEL_DIR, torch.float32)


def test_routed_output_matches_the_experts_module(model):
    module = fused_experts(model)[2]
    weights = read_families(model)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, weights["gate"].shape[-1], generator=gen)
    index = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(10)])      # [T, k] distinct experts
    routing = torch.rand(10, 4, generator=gen)
    with torch.no_grad():
        expected = module(hidden, index, routing)
    got = routed_output(weights["gate"][2], weights["up"][2], weights["down"][2], module.act_fn,
                        Routed(hidden, index, routing))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_output_error_is_zero_for_the_original_and_grows_with_the_perturbation(model):
    weights = read_families(model)
    module = fused_experts(model)[0]
    gen = torch.Generator().manual_seed(1)
    tokens = [Routed(torch.randn(8, 256, generator=gen), torch.randint(0, 16, (8, 4), generator=gen),
                     torch.rand(8, 4, generator=gen)) for _ in range(6)]
    assert output_error(weights, weights, module.act_fn, tokens)["rel_err"] == 0.0
    noisy = lambda s: {f: w + s * torch.randn(w.shape, generator=gen) * w.std() for f, w in weights.items()}
    small = output_error(weights, noisy(0.01), module.act_fn, tokens)
    large = output_error(weights, noisy(0.1), module.act_fn, tokens)
    assert 0 < small["rel_err"] < large["rel_err"] and len(large["per_layer"]) == 6
