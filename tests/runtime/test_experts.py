"""GlobeExperts: the projected path (decode, phi = identity) gives the mixed path's output and is chosen only
where it reads fewer atoms."""
from __future__ import annotations

import torch

from globe.export import load_model
from globe.runtime import apply_globe, globe_modules
from tests.helpers.fits import shaped_result


def test_projected_path_equals_mixing_and_is_chosen_by_cost(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    module = globe_modules(apply_globe(load_model(path), shaped_result(path, m=3, r=4, k=2), mode="factored"))[0]
    assert module._projected_families(1, 2, [0, 3]) == {"gate", "up"}       # 1 token x 3 atoms < 2 experts x 2
    assert module._projected_families(2, 4, [0, 3]) == set()                # 2 x 3 > 2 x 2: mix
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, module.hidden_dim, generator=gen)
    index, weights = torch.tensor([[0, 3]]), torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        projected = module(x, index, weights)
        module._projected_families = lambda *args: set()
        mixed = module(x, index, weights)
    torch.testing.assert_close(projected, mixed, rtol=1e-5, atol=1e-6)
    assert projected.abs().max() > 0


def test_cached_mode_projects_only_when_the_misses_cost_more(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    model = apply_globe(load_model(path), shaped_result(path, m=3, r=4, k=2), mode="cached", cache_size=2,
                        collect_stats=True)
    module = globe_modules(model)[0]
    x, weights = torch.randn(1, module.hidden_dim), torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        projected = module(x, torch.tensor([[0, 3]]), weights)    # 2 misses x (2 + 2) > 3 + 3: projected
        assert module.cache.stats()["resident"] == 0 and (module.cache.hits, module.cache.misses) == (0, 2)
        module.warm_up(torch.tensor([5, 0, 0, 5]))                 # experts 0 and 3 resident: nothing to mix
        cached = module(x, torch.tensor([[0, 3]]), weights)
    assert module.cache.hits == 2 and module.cache.misses == 0
    torch.testing.assert_close(projected, cached, rtol=1e-5, atol=1e-6)
