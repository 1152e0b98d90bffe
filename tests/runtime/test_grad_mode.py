"""Inference without torch.no_grad(): a loaded compressed model whose parameters are frozen (nothing requires
grad) uses its caches under grad mode exactly as under no_grad, as a model run by a plain script or a notebook
(`model(**x)`) is: cached mode mixes each expert once for two forwards, dense mode never reconstructs again. With
a factor requiring grad the caches are bypassed, so training sees fresh weights and gradients reach the factors."""
from __future__ import annotations

import pytest
import torch

from globe.export import load_compressed, save_compressed
from globe.runtime import globe_modules, set_mode
from globe.runtime.experts import GlobeExperts
from tests.helpers.fits import quick_fit


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    return save_compressed(path, quick_fit(path), tmp_path_factory.mktemp("grad") / "c")


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def counted(monkeypatch):
    """How many experts were mixed (mixed_atoms) and whole layers reconstructed (reconstruct) per family."""
    calls = {"mixed": 0, "reconstructed": 0}
    mixed_atoms, reconstruct = GlobeExperts.mixed_atoms, GlobeExperts.reconstruct

    def count_mixed(self, experts, families=None):
        calls["mixed"] += int(experts.numel())
        return mixed_atoms(self, experts, families)

    def count_reconstruct(self, family):
        calls["reconstructed"] += 1
        return reconstruct(self, family)
    monkeypatch.setattr(GlobeExperts, "mixed_atoms", count_mixed)
    monkeypatch.setattr(GlobeExperts, "reconstruct", count_reconstruct)
    return calls


def _frozen(path, mode: str) -> torch.nn.Module:
    model = load_compressed(path, mode=mode, dtype=torch.float32)
    model.requires_grad_(False)
    if mode == "cached":                                   # room for every expert: the second forward only hits
        set_mode(model, "cached", cache_size=next(iter(globe_modules(model).values())).num_experts)
    return model


def test_cached_mode_mixes_once_for_two_forwards_without_no_grad(compressed, counted):
    model = _frozen(compressed, "cached")
    assert torch.is_grad_enabled()
    first = model(input_ids=_ids(), use_cache=False).logits
    mixed_first = counted["mixed"]
    second = model(input_ids=_ids(), use_cache=False).logits
    assert mixed_first > 0 and counted["mixed"] == mixed_first           # the second forward: cache hits only
    assert not second.requires_grad and torch.equal(first, second)
    with torch.no_grad():                                                 # the same as under no_grad
        assert torch.equal(model(input_ids=_ids(), use_cache=False).logits, second)
    assert counted["mixed"] == mixed_first


def test_dense_mode_never_reconstructs_again_without_no_grad(compressed, counted):
    model = _frozen(compressed, "dense")
    built = counted["reconstructed"]
    for _ in range(2):
        model(input_ids=_ids(), use_cache=False)
    assert counted["reconstructed"] == built and counted["mixed"] == 0


def test_a_factor_requiring_grad_bypasses_the_caches_and_gets_gradients(compressed, counted):
    model = _frozen(compressed, "cached")
    module = next(iter(globe_modules(model).values()))
    bank = module.bank["gate"]
    bank.requires_grad_(True)                                             # training this factor only
    ids = _ids()
    for step in range(2):
        mixed = counted["mixed"]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        assert counted["mixed"] > mixed                                    # mixed in the graph every forward
        loss.backward()
        assert bank.grad is not None and bank.grad.abs().sum() > 0
        with torch.no_grad():
            bank -= 0.1 * bank.grad
        bank.grad = None
    model.requires_grad_(False)
    fresh = model(input_ids=ids, use_cache=False).logits                  # caches follow the trained bank
    set_mode(model, "factored")
    assert torch.allclose(fresh, model(input_ids=ids, use_cache=False).logits, atol=1e-5)
