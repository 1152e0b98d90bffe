"""collect_routing_counts (router hooks count top-k choices per layer, the same on original and patched models) and
the registry's in-memory module paths of the experts and routers."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.io.arch import get_arch
from globe.runtime import apply_globe, collect_routing_counts, globe_modules, warm_up
from tests.helpers.fits import exact_result
from tests.helpers.tiny_models import TINY, TINY_ARCHS, TINY_DENSE_LAYERS


def test_counts_cover_every_routed_choice_and_match_the_patched_model(tiny_model):
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 64, (50,), generator=torch.Generator().manual_seed(0))
    counts = collect_routing_counts(model, ids, window=16)
    assert sorted(counts) == [0, 2]                                   # layer 1 is dense in the tiny Qwen2-MoE
    for layer_counts in counts.values():
        assert layer_counts.shape == (TINY.num_experts,) and int(layer_counts.sum()) == 50 * TINY.top_k
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="cached", cache_size=2)
    again = collect_routing_counts(patched, ids, window=16)
    assert all(torch.equal(counts[layer], again[layer]) for layer in counts)
    assert not any(m._forward_hooks for m in patched.modules())      # hooks removed


def test_warm_up_from_counts_makes_the_same_text_hit(tiny_model):
    model = tiny_model("deepseek_v2")
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="cached",
                          cache_size=TINY.num_experts, collect_stats=True)
    ids = torch.randint(3, 64, (32,), generator=torch.Generator().manual_seed(1))
    loaded = warm_up(patched, collect_routing_counts(patched, ids))
    assert set(loaded) == set(globe_modules(patched)) == {1, 2}
    with torch.no_grad():
        patched(input_ids=ids[None], use_cache=False)
    for module in globe_modules(patched).values():
        assert module.cache.misses == 0 and module.cache.hits > 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_registry_module_paths_resolve_in_every_architecture(tiny_model, arch):
    model = tiny_model(arch)
    spec = get_arch(model.config.to_dict())
    layers = spec.moe_layers(model.config.to_dict())
    assert layers == [l for l in range(TINY.num_layers) if l not in TINY_DENSE_LAYERS[arch]]
    hidden = torch.randn(5, TINY.d)
    for layer in layers:
        experts = model.get_submodule(spec.experts_path(layer))
        assert experts.gate_up_proj.shape == (TINY.num_experts, 2 * TINY.p, TINY.d)
        _, weights, index = model.get_submodule(spec.router_path(layer))(hidden)
        assert index.shape == weights.shape == (5, TINY.top_k)
