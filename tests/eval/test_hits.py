"""decode_hit_rate: per-token cache accounting while decoding through the KV cache."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.eval import decode_hit_rate
from globe.runtime import apply_globe, collect_routing_counts, globe_modules, warm_up
from tests.helpers.fits import exact_result
from tests.helpers.tiny_models import TINY


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(3))


def test_every_decoded_token_is_one_access_per_routed_expert(tiny_model):
    model = tiny_model("olmoe")
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="cached", cache_size=1)
    stats = decode_hit_rate(patched, _ids(30), tokens=24, window=10)
    assert stats["tokens"] == 24
    assert stats["hits"] + stats["misses"] == 24 * TINY.top_k * TINY.num_layers
    assert not any(m.cache.collect_stats for m in globe_modules(patched).values())   # switched off again


def test_full_capacity_after_warm_up_never_misses_and_uncached_models_give_none(tiny_model):
    model = tiny_model("mixtral")
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="cached", cache_size=TINY.num_experts)
    warm_up(patched, collect_routing_counts(patched, _ids(64)))
    stats = decode_hit_rate(patched, _ids(20), tokens=20)
    assert stats["misses"] == 0 and stats["hit_rate"] == pytest.approx(1.0)
    assert decode_hit_rate(model, _ids(20)) is None
    assert decode_hit_rate(apply_globe(copy.deepcopy(model), exact_result(model), mode="dense"), _ids(20)) is None
