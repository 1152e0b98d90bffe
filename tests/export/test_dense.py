"""Dense export: stock transformers loads it with zero missing/unexpected keys, hub keys, source dtype, and its
logits equal the model patched in `dense` mode."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from globe.errors import ArtifactError
from globe.export import export_dense, load_model
from globe.runtime import apply_globe
from tests.helpers.fits import char_tokenizer, exact_result, quick_fit
from tests.helpers.tiny_models import TINY


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_ids(), use_cache=False).logits


def _keys(out) -> set[str]:
    keys = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            keys |= set(fh.keys())
    return keys


@pytest.mark.parametrize("arch, layout, dtype, gate_key, tol", [
    ("qwen2_moe", "per_expert", torch.float32, "model.layers.0.mlp.experts.3.gate_proj.weight", 1e-5),
    ("qwen2_moe", "fused", torch.bfloat16, "model.layers.2.mlp.experts.0.up_proj.weight", 3e-2),
    ("mixtral", "per_expert", torch.bfloat16, "model.layers.1.block_sparse_moe.experts.2.w1.weight", 3e-2),
    ("deepseek_v2", "fused", torch.float32, "model.layers.2.mlp.experts.1.gate_proj.weight", 1e-5),
])
def test_dense_export_loads_in_stock_transformers(tmp_path, tiny_checkpoint, arch, layout, dtype, gate_key, tol):
    import transformers
    path = tiny_checkpoint(arch, layout=layout, dtype=dtype)
    result = quick_fit(path)
    out = export_dense(path, result, tmp_path / "hf")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == dtype and gate_key in _keys(out) and not any("gate_up_proj" in k for k in _keys(out))
    patched = apply_globe(load_model(path), result, mode="dense")
    torch.testing.assert_close(_logits(model).float(), _logits(patched).float(), rtol=tol, atol=tol)
    assert not list(out.glob(".*"))                                    # no staging or temp files left


def test_exact_artifact_exports_the_original_weights(tmp_path, tiny_checkpoint, tiny_model):
    import transformers
    path = tiny_checkpoint("olmoe")
    out = export_dense(path, exact_result(tiny_model("olmoe")), tmp_path / "hf")
    original = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert original.keys() == exported.keys()
    for key in original:
        torch.testing.assert_close(exported[key], original[key], rtol=0, atol=1e-6, msg=key)


def test_export_from_patched_model_equals_export_from_directory(tmp_path, tiny_checkpoint):
    import transformers
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    a = export_dense(path, result, tmp_path / "a")
    b = export_dense(apply_globe(load_model(path), result, mode="cached"), result, tmp_path / "b")
    sa = transformers.AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = transformers.AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_and_generation_config_are_copied(tmp_path, tiny_checkpoint):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), src)
    char_tokenizer(src)
    out = export_dense(src, quick_fit(tiny_checkpoint("qwen2_moe")), tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    import transformers
    assert transformers.AutoTokenizer.from_pretrained(out).decode([3 + 1, 3 + 2]) == "ab"


def test_artifact_of_another_model_is_refused(tmp_path, tiny_checkpoint, tiny_model):
    path = tiny_checkpoint("mixtral")
    bigger = exact_result(tiny_model("qwen2_moe"), model_type="mixtral")
    with pytest.raises(ArtifactError, match=f"covers MoE layers \\[0, 2\\] x {TINY.num_experts} experts"):
        export_dense(path, bigger, tmp_path / "hf")


def test_fitted_down_family_exports_and_runs_like_the_patched_model(tmp_path, tiny_checkpoint):
    import transformers
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path, ("gate", "up", "down"))
    out = export_dense(path, result, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    patched = apply_globe(load_model(path), result, mode="factored")
    torch.testing.assert_close(_logits(model), _logits(patched), rtol=1e-4, atol=1e-4)
    down = model.state_dict()["model.layers.0.mlp.experts.down_proj"]                 # [E, d, p]
    original = load_model(path).state_dict()["model.layers.0.mlp.experts.down_proj"]
    assert down.shape == original.shape and not torch.allclose(down, original)
