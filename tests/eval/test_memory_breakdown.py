"""Where the bytes go: weights (stored tensors) vs caches (rebuilt by the runtime) vs framework (the rest of RSS)."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.eval.evaluate import evaluate, memory_breakdown
from globe.runtime import apply_globe
from globe.runtime.memory import held_breakdown, model_bytes
from tests.helpers.fits import exact_result
from tests.helpers.tiny_models import make_tiny_model


def _patched(mode: str):
    model = make_tiny_model("qwen2_moe")
    return model, apply_globe(copy.deepcopy(model), exact_result(model), mode=mode, cache_size=2)


def _hand_cache_bytes(patched, mode: str) -> int:
    total = 0
    for module in patched.modules():
        if type(module).__name__ != "GlobeExperts":
            continue
        for f in module.factored:
            r, d = module.layer_bank(f).shape[1:]
            rows = 2 if mode == "cached" else module.num_experts
            out = module.adapters[f].shape[1] if mode == "dense" else r
            total += rows * out * d * module.bank[f].element_size()
    return total


@pytest.mark.parametrize("mode", ["cached", "dense", "factored"])
def test_caches_are_the_rebuilt_tensors_and_weights_the_rest(mode):
    _, patched = _patched(mode)
    held = held_breakdown(patched)
    assert held["caches"] == _hand_cache_bytes(patched, mode) if mode != "factored" else held["caches"] == 0
    assert held["weights"] + held["caches"] == model_bytes(patched)


def test_original_model_has_no_cache():
    model, _ = _patched("factored")
    assert held_breakdown(model) == {"weights": model_bytes(model), "caches": 0}


def test_framework_is_the_rest_of_the_resident_set():
    _, patched = _patched("cached")
    held = held_breakdown(patched)
    out = memory_breakdown(patched, rss_mb=500.0)
    assert out["weights_mb"] == pytest.approx(held["weights"] / 2**20)
    assert out["caches_mb"] == pytest.approx(held["caches"] / 2**20)
    assert out["weights_mb"] + out["caches_mb"] + out["framework_mb"] == pytest.approx(500.0)


def test_evaluate_reports_the_breakdown():
    _, patched = _patched("cached")
    ids = torch.randint(0, patched.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    report = evaluate(patched, None, ids, max_length=16, skip_speed=True, hit_tokens=8)
    b = report["memory"]["breakdown"]
    assert b["caches_mb"] > 0 and b["weights_mb"] > 0
    assert b["weights_mb"] + b["caches_mb"] + b["framework_mb"] == pytest.approx(report["memory"]["rss_mb"])
