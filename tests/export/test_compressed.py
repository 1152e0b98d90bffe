"""Compressed checkpoint: save -> load_compressed gives bit-identical logits; damaged directories are refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe.errors import ArtifactError
from globe.export import MARKER_FILE, WEIGHTS_FILE, load_compressed, load_model, save_compressed
from globe.runtime import apply_globe, globe_modules
from tests.helpers.fits import quick_fit


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_ids(), use_cache=False).logits


@pytest.mark.parametrize("arch, dtype, mode", [("qwen2_moe", torch.float32, "cached"),
                                               ("qwen2_moe", torch.bfloat16, "dense"),
                                               ("mixtral", torch.float32, "factored"),
                                               ("deepseek_v3", torch.bfloat16, "cached")])
def test_save_load_round_trip_is_bit_identical(tmp_path, tiny_checkpoint, arch, dtype, mode):
    path = tiny_checkpoint(arch, dtype=dtype)
    result = quick_fit(path)
    save_compressed(path, result, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c", mode=mode, cache_size=2)
    in_memory = apply_globe(load_model(path), result, mode=mode, cache_size=2)
    assert loaded.dtype == dtype and {m.mode for m in globe_modules(loaded).values()} == {mode}
    assert torch.equal(_logits(loaded), _logits(in_memory))
    stored = load_file(str(tmp_path / "c" / WEIGHTS_FILE))
    assert not any("gate_up_proj" in k or ".bank." in k or ".adapters." in k for k in stored)
    assert any(k.endswith("experts.down_proj") for k in stored)


def test_export_from_a_patched_model_equals_export_from_the_directory(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    save_compressed(path, result, tmp_path / "a")
    save_compressed(apply_globe(load_model(path), result, mode="dense"), result, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compressed_directory_is_not_silently_loaded_by_stock_transformers(tmp_path, tiny_checkpoint):
    import transformers
    path = tiny_checkpoint("mixtral")
    save_compressed(path, quick_fit(path), tmp_path / "c")
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_missing_marker_or_weights_are_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    with pytest.raises(ArtifactError, match="not a GloBE compressed checkpoint"):
        load_compressed(path)
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="the checkpoint is incomplete"):
        load_compressed(out)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    tensors = load_file(str(out / WEIGHTS_FILE))
    tensors["model.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, str(out / WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"):
        load_compressed(out)


def test_newer_format_is_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    marker = json.loads((out / MARKER_FILE).read_text())
    (out / MARKER_FILE).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99.*upgrade globe"):
        load_compressed(out)


def test_tied_embeddings_round_trip(tmp_path):
    from tests.helpers.tiny_models import make_tiny_checkpoint
    path = make_tiny_checkpoint("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    result = quick_fit(path)
    save_compressed(path, result, tmp_path / "c")
    assert "lm_head.weight" not in load_file(str(tmp_path / "c" / WEIGHTS_FILE))      # stored once
    loaded = load_compressed(tmp_path / "c", mode="factored")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(apply_globe(load_model(path), result, mode="factored")))


def test_storage_dtype_of_a_patched_model_is_kept(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    result = quick_fit(path)
    model = apply_globe(load_model(path), result, mode="factored", dtype=torch.float32)
    save_compressed(model, result, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c", mode="factored")
    assert loaded.dtype == torch.bfloat16 and globe_modules(loaded)[0].bank["gate"].dtype == torch.float32
    assert torch.equal(_logits(loaded), _logits(model))


def test_artifact_is_stored_in_the_runtime_dtype(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    banks = load_file(str(out / "banks.safetensors"))
    assert banks["gate.bank"].dtype == banks["up.adapters"].dtype == torch.bfloat16
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in path.glob("*.safetensors"))   # smaller than the source on disk
