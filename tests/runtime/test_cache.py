"""MixedCache: LRU eviction order, hit/miss accounting, warm-up, and the cache as seen through GlobeExperts."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.runtime import MixedCache, apply_globe, cache_stats, globe_modules, warm_up
from tests.helpers.fits import exact_result

SHAPES = {"gate": (2, 3), "up": (2, 3)}


class Composer:
    """compose() stand-in: expert e -> a tensor filled with e (per family offset); records every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(experts.tolist())
        e = experts.float()[:, None, None]
        return {"gate": e.expand(-1, 2, 3).clone(), "up": (e + 100).expand(-1, 2, 3).clone()}


def _cache(capacity: int) -> MixedCache:
    cache = MixedCache(capacity, SHAPES, torch.float32)
    cache.collect_stats = True
    return cache


def test_lru_eviction_order_and_counts_on_a_scripted_sequence():
    cache, compose = _cache(3), Composer()
    script = [[0], [1], [2], [0], [3], [1], [0], [2], [4, 0]]
    for step in script:
        out = cache.fetch(step, compose)
        assert out["gate"][:, 0, 0].tolist() == [float(e) for e in step]
        assert out["up"][:, 0, 0].tolist() == [float(e) + 100 for e in step]
    # 0,1,2 miss; 0 hit; 3 miss evicts 1; 1 miss evicts 2; 0 hit; 2 miss evicts 3; 0 hit then 4 miss evicts 1
    assert compose.calls == [[0], [1], [2], [3], [1], [2], [4]]
    assert (cache.hits, cache.misses) == (3, 7)
    assert cache.resident() == [2, 0, 4]
    assert cache.stats()["hit_rate"] == pytest.approx(0.3)


def test_more_experts_than_capacity_in_one_batch():
    cache, compose = _cache(2), Composer()
    cache.fetch([5], compose)
    out = cache.fetch([1, 5, 7, 9], compose)
    assert out["gate"][:, 0, 0].tolist() == [1.0, 5.0, 7.0, 9.0]
    assert cache.resident() == [7, 9]                     # 5 refreshed, then 1, 7, 9 inserted: 7 and 9 evict
    assert torch.equal(cache.slots("gate")[[cache.order[7], cache.order[9]], 0, 0], torch.tensor([7.0, 9.0]))
    assert (cache.hits, cache.misses) == (1, 4)


def test_capacity_zero_never_caches():
    cache, compose = _cache(0), Composer()
    for _ in range(3):
        cache.fetch([1, 2], compose)
    assert compose.calls == [[1, 2]] * 3 and cache.resident() == [] and cache.hits == 0


def test_stats_are_not_collected_when_off():
    cache, compose = _cache(2), Composer()
    cache.collect_stats = False
    cache.fetch([1], compose)
    cache.fetch([1], compose)
    assert (cache.hits, cache.misses) == (0, 0) and len(compose.calls) == 1


def test_warm_up_loads_the_most_routed_experts_and_resets_counters():
    cache, compose = _cache(2), Composer()
    cache.fetch([6], compose)
    loaded = cache.warm_up(torch.tensor([5, 0, 9, 1, 0, 0, 0]), compose)
    assert loaded == [0, 2] and cache.resident() == [0, 2]             # most frequent is most recently used
    assert (cache.hits, cache.misses) == (0, 0)
    cache.fetch([2, 0], compose)
    assert (cache.hits, cache.misses) == (2, 0)
    assert _cache(4).warm_up(torch.tensor([0, 3, 0]), compose) == [1]  # never-routed experts are not loaded


def test_globe_experts_cache_accounting_on_scripted_routing(tiny_model):
    model = tiny_model("mixtral")
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="cached", cache_size=2, collect_stats=True)
    module = globe_modules(patched)[0]
    hidden = torch.randn(3, module.hidden_dim)
    weights = torch.full((3, 1), 1.0)
    for experts in ([0, 1, 0], [2, 2, 2], [1, 3, 3]):           # routed sets {0,1}, {2}, {1,3}
        module(hidden, torch.tensor(experts)[:, None], weights)
    assert module.cache.resident() == [1, 3]                    # 2 evicted 0; 1 was a hit, 3 evicted 2
    assert (module.cache.hits, module.cache.misses) == (1, 4)
    module(hidden, torch.tensor([[1], [3], [1]]), weights)
    stats = cache_stats(patched)
    assert (stats["hits"], stats["misses"]) == (3, 4) and stats["per_layer"]["0"]["hit_rate"] == pytest.approx(3 / 7)
    warm_up(patched, {0: torch.tensor([0, 7, 0, 1]), 1: torch.tensor([1, 1, 1, 1])})
    assert module.cache.resident() == [3, 1] and module.cache.hits == 0
