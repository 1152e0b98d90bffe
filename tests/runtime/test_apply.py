"""apply_globe / GlobeExperts: parity with the original model, mode agreement, shared banks, validation errors."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.errors import ArtifactError, ConfigError
from globe.export import load_model
from globe.runtime import (apply_globe, globe_modules, reconstruct_rows, set_mode, sparse_codes)
from globe.runtime.apply import layer_rows
from tests.helpers.fits import exact_result, quick_fit
from tests.helpers.tiny_models import TINY, make_tiny_model

MODES = ("factored", "cached", "dense")


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits on the CPU of ids run on the model's device."""
    return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.cpu()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v2", "olmoe"])
@pytest.mark.parametrize("mode", MODES)
def test_exact_bank_reproduces_the_original_logits(tiny_model, arch, mode, device):
    model = copy.deepcopy(tiny_model(arch)).to(device)
    patched = apply_globe(copy.deepcopy(model), exact_result(tiny_model(arch)), mode=mode, cache_size=2)
    for ids in (_ids(), _ids(1, 3, seed=1)):                       # grouped path and gathered (decode-size) path
        torch.testing.assert_close(_logits(patched, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_factored_cached_dense_agree(tiny_checkpoint, arch, device):
    path = tiny_checkpoint(arch)
    result = quick_fit(path)
    outs = {}
    for mode in MODES:
        for pairs in (0, 10_000):                                  # force the grouped loop / the gathered path
            model = apply_globe(load_model(path, device=device), result, mode=mode, cache_size=1,
                                max_gathered_pairs=pairs)
            inputs = [_ids()] + [_ids(1, 1, seed=s) for s in range(4)]
            outs[mode, pairs] = [_logits(model, ids) for ids in inputs]
    ref = outs["dense", 0]
    for key, out in outs.items():
        for got, want in zip(out, ref):                            # many tokens, then single tokens (few experts)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{key} differs from dense")
    assert (ref[0] - _logits(load_model(path), _ids())).abs().max() > 1e-4   # the fit is not exact: a real change


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_dense_mode_equals_reconstructed_weights_loaded_normally(tiny_checkpoint, dtype, tol):
    path = tiny_checkpoint("qwen2_moe", dtype=dtype)
    result = quick_fit(path)
    patched = apply_globe(load_model(path), result, mode="dense")
    plain = load_model(path)
    layers = sorted(globe_modules(patched))
    for family, fam in result.families.items():
        rows = layer_rows(fam, layers, TINY.num_experts)
        for layer in layers:
            weight = plain.model.layers[layer].mlp.experts.gate_up_proj
            block = slice(0, TINY.p) if family == "gate" else slice(TINY.p, 2 * TINY.p)
            with torch.no_grad():
                weight[:, block] = reconstruct_rows(fam, rows[layer], dtype, factor_dtype=dtype)
    assert plain.dtype == patched.dtype == dtype
    torch.testing.assert_close(_logits(patched, _ids()).float(), _logits(plain, _ids()).float(), rtol=tol, atol=tol)


def test_bank_is_one_tensor_shared_by_every_layer(tiny_checkpoint):
    model = apply_globe(load_model(tiny_checkpoint("deepseek_v2")), quick_fit(tiny_checkpoint("deepseek_v2")))
    modules = list(globe_modules(model).values())
    assert len(modules) == 2
    for family in ("gate", "up"):
        assert modules[0].bank[family] is modules[1].bank[family]
        assert modules[0].bank[family].data_ptr() == modules[1].bank[family].data_ptr()
        assert modules[0].adapters[family].data_ptr() != modules[1].adapters[family].data_ptr()
    names = [n for n, _ in model.named_parameters() if n.endswith("bank.gate")]
    assert len(names) == 1                                          # counted once
    model.to(torch.float64)
    assert modules[0].bank["gate"] is modules[1].bank["gate"] and modules[0].bank["gate"].dtype == torch.float64


@pytest.mark.parametrize("mode", MODES)
def test_generate_works_in_every_mode(tiny_checkpoint, mode, device):
    path = tiny_checkpoint("mixtral")
    ids, mask = _ids(1, 5).to(device), torch.ones(1, 5, dtype=torch.long, device=device)
    model = apply_globe(load_model(path, device=device), quick_fit(path), mode=mode, cache_size=2)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 11)
    dense = apply_globe(load_model(path, device=device), quick_fit(path), mode="dense")
    ref = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, ref)


def test_set_mode_switches_without_changing_outputs(tiny_checkpoint, device):
    path = tiny_checkpoint("qwen2_moe")
    model = apply_globe(load_model(path, device=device), quick_fit(path), mode="factored")
    ref = _logits(model, _ids())
    for mode in ("dense", "cached", "factored"):
        set_mode(model, mode, cache_size=3)
        assert {m.mode for m in globe_modules(model).values()} == {mode}
        torch.testing.assert_close(_logits(model, _ids()), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="runtime mode must be one of"):
        set_mode(model, "fast")


def test_a_fitted_down_family_is_applied_too(tiny_model):
    model = tiny_model("olmoe")
    patched = apply_globe(copy.deepcopy(model), exact_result(model, ("gate", "up", "down")), mode="cached")
    module = next(iter(globe_modules(patched).values()))
    assert module.factored == ("gate", "up", "down") and not hasattr(module, "down_proj")
    torch.testing.assert_close(_logits(patched, _ids()), _logits(model, _ids()), rtol=1e-5, atol=1e-5)


def test_only_up_fitted_keeps_gate_dense(tiny_model):
    model = tiny_model("qwen3_moe")
    patched = apply_globe(copy.deepcopy(model), exact_result(model, ("up",)), mode="factored")
    module = next(iter(globe_modules(patched).values()))
    assert module.factored == ("up",) and module.gate_proj.shape == (TINY.num_experts, TINY.p, TINY.d)
    torch.testing.assert_close(_logits(patched, _ids()), _logits(model, _ids()), rtol=1e-5, atol=1e-5)


def test_artifact_of_another_architecture_is_rejected(tiny_model):
    qwen = tiny_model("qwen2_moe")
    with pytest.raises(ArtifactError, match="fitted on a qwen2_moe model but the model is mixtral"):
        apply_globe(copy.deepcopy(tiny_model("mixtral")), exact_result(qwen))


def test_artifact_with_other_dims_is_rejected(tiny_model):
    wide = make_tiny_model("mixtral", intermediate_size=2 * TINY.p)
    with pytest.raises(ArtifactError, match=r"family gate has p=16 d=24, the model's experts need p=8 d=24"):
        apply_globe(copy.deepcopy(tiny_model("mixtral")), exact_result(wide))


def test_artifact_with_other_layers_or_experts_is_rejected(tiny_model):
    deeper = make_tiny_model("mixtral", num_hidden_layers=TINY.num_layers + 1)
    with pytest.raises(ArtifactError, match=r"covers MoE layers \[0, 1, 2, 3\] x 4 experts, the model has "
                                            r"\[0, 1, 2\] x 4"):
        apply_globe(copy.deepcopy(tiny_model("mixtral")), exact_result(deeper))
    more = make_tiny_model("mixtral", num_local_experts=TINY.num_experts * 2)
    with pytest.raises(ArtifactError, match="x 8 experts, the model has"):
        apply_globe(copy.deepcopy(tiny_model("mixtral")), exact_result(more))


def test_patching_twice_is_rejected(tiny_model):
    model = tiny_model("mixtral")
    patched = apply_globe(copy.deepcopy(model), exact_result(model))
    with pytest.raises(ArtifactError, match="already patched"):
        apply_globe(patched, exact_result(model))


def test_unknown_mode_and_negative_cache_are_rejected(tiny_model):
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="runtime mode"):
        apply_globe(copy.deepcopy(model), exact_result(model), mode="turbo")
    with pytest.raises(ConfigError, match="cache_size must be >= 0"):
        apply_globe(copy.deepcopy(model), exact_result(model), cache_size=-1)


def test_artifact_directory_is_accepted(tmp_path, tiny_checkpoint):
    import globe
    path = tiny_checkpoint("qwen2_moe")
    globe.save(quick_fit(path), tmp_path / "art")
    a = apply_globe(load_model(path), tmp_path / "art", mode="factored")
    b = apply_globe(load_model(path), quick_fit(path), mode="factored")
    assert torch.equal(_logits(a, _ids()), _logits(b, _ids()))


def test_sparse_codes_keep_every_nonzero():
    codes = torch.tensor([[0.0, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    idx, val = sparse_codes(codes)
    assert idx.shape == val.shape == (3, 2)
    dense = torch.zeros_like(codes).scatter_add_(1, idx, val)
    assert torch.equal(dense, codes)


def test_grouped_linear_fallback_matches_grouped_mm(monkeypatch):
    from globe.runtime import experts as experts_module
    x, weight = torch.randn(9, 8), torch.randn(4, 5, 8)
    offsets = torch.tensor([2, 2, 7, 9], dtype=torch.int32)                    # expert 1 gets no rows
    assert experts_module._use_grouped_mm(x, weight) == hasattr(torch.nn.functional, "grouped_mm")
    assert not experts_module._use_grouped_mm(x[:, :6], weight[..., :6].contiguous())   # 24-byte rows
    fast = experts_module.grouped_linear(x, weight, offsets)
    monkeypatch.setattr(experts_module, "_use_grouped_mm", lambda x, weight: False)
    slow = experts_module.grouped_linear(x, weight, offsets)
    want = torch.cat([x[:2] @ weight[0].T, x[2:7] @ weight[2].T, x[7:] @ weight[3].T])
    torch.testing.assert_close(fast, want)
    torch.testing.assert_close(slow, want)


@pytest.mark.parametrize("tokens", [2, 12])                                       # gathered and grouped paths
def test_sentinel_experts_are_skipped_like_the_original(tiny_model, tokens):
    model = tiny_model("mixtral")
    module = globe_modules(apply_globe(copy.deepcopy(model), exact_result(model), mode="cached"))[0]
    hidden = torch.randn(tokens, TINY.d, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, TINY.num_experts, (tokens, 2), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(tokens, 2, generator=torch.Generator().manual_seed(2))
    sentinel = index.clone()
    sentinel[0, 1] = TINY.num_experts                                              # "not on this rank"
    zeroed = weights.clone()
    zeroed[0, 1] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(module(hidden, sentinel, weights), module(hidden, index, zeroed))


def test_grouped_linear_ignores_the_row_padding_of_its_input():
    """grouped_mm pads output rows to 16 bytes (r = 23 in bf16: a row stride of 24); the next projection must not
    read that padding (torch 2.13's CPU bf16 GEMM does for such shapes: NaN logits at r = 49 on mixtral-e8-top2)."""
    from globe.runtime import experts as experts_module
    full = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    full[:, 23:] = float("nan")                                                    # the padding
    x = full[:, :23]                                                               # [40, 23], row stride 24
    weight = torch.randn(3, 32, 23, generator=torch.Generator().manual_seed(1)).bfloat16()
    offsets = torch.tensor([11, 30, 40], dtype=torch.int32)
    got = experts_module.grouped_linear(x, weight, offsets)
    dense = x.contiguous().float()
    want = torch.cat([dense[:11] @ weight[0].float().T, dense[11:30] @ weight[1].float().T,
                      dense[30:] @ weight[2].float().T])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)

