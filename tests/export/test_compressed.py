"""Compressed checkpoint: transformers' from_pretrained / save_pretrained after `import globe` (quant_method
"globe"), load_compressed, logits bit-identical to the original patched with the same artifact; damaged
directories are refused; format-1 checkpoints still load."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import globe  # noqa: F401  (registers the quantizer)
from globe.artifact import load, save
from globe.errors import ArtifactError
from globe.export import is_compressed, load_compressed, load_model, save_compressed
from globe.runtime import apply_globe, globe_modules, set_mode
from tests.helpers.fits import quick_fit

WEIGHTS = "model.safetensors"


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
    stored = load_file(str(tmp_path / "c" / WEIGHTS))
    assert not any("gate_up_proj" in k for k in stored)
    assert sum(k.endswith(".bank.gate") for k in stored) == 1                 # the bank once, for every layer
    assert any("down_proj" in k or ".w2." in k for k in stored)                # dense down kept, hub names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["cached", "factored", "dense"])
def test_from_pretrained_equals_apply_globe_on_the_original(tmp_path, tiny_checkpoint, dtype, mode):
    """Stock from_pretrained of the export, in any dtype, gives the logits of the original model loaded in that
    dtype and patched with the stored artifact, in the same mode."""
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    artifact = save(quick_fit(path), tmp_path / "art")                         # stored in bf16
    save_compressed(path, artifact, tmp_path / "c")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=dtype, device_map="cpu")
    set_mode(model, mode, cache_size=2)
    reference = apply_globe(load_model(path, dtype), load(artifact), mode=mode, cache_size=2)
    assert model.dtype == dtype and globe_modules(model)[0].bank["gate"].dtype == dtype
    assert torch.equal(_logits(model), _logits(reference))


def test_save_pretrained_of_a_patched_model_round_trips(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    patched = apply_globe(load_model(path), quick_fit(path), mode="factored")
    patched.save_pretrained(tmp_path / "a")                                   # no "shared tensors" error
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "globe" and set(config["families"]) == {"gate", "up"}
    assert is_compressed(tmp_path / "a")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    modules = globe_modules(loaded)
    assert all(m.bank["gate"] is modules[0].bank["gate"] for m in modules.values())   # tied back, stored once
    set_mode(loaded, "factored")
    assert torch.equal(_logits(loaded), _logits(patched))
    loaded.save_pretrained(tmp_path / "b")                                    # and again, byte for byte
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()


def test_export_from_a_patched_model_equals_export_from_the_directory(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    save_compressed(path, result, tmp_path / "a")
    save_compressed(apply_globe(load_model(path), result, mode="dense"), result, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / WEIGHTS)), load_file(str(tmp_path / "b" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_an_in_memory_original_leaves_it_untouched(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    model = load_model(path)
    save_compressed(model, quick_fit(path), tmp_path / "c")
    assert not globe_modules(model) and getattr(model.config, "quantization_config", None) is None


def test_missing_marker_or_weights_are_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    with pytest.raises(ArtifactError, match="not a GloBE compressed checkpoint"):
        load_compressed(path)
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    (out / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match="the checkpoint is incomplete"):
        load_compressed(out)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    tensors = load_file(str(out / WEIGHTS))
    tensors["model.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"):
        load_compressed(out)


def test_newer_format_is_refused(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="format_version 99.*upgrade globe"):
        load_compressed(out)
    with pytest.raises(ArtifactError, match="format_version 99.*upgrade globe"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_tied_embeddings_round_trip(tmp_path):
    from tests.helpers.tiny_models import make_tiny_checkpoint
    path = make_tiny_checkpoint("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    result = quick_fit(path)
    save_compressed(path, result, tmp_path / "c")
    assert "lm_head.weight" not in load_file(str(tmp_path / "c" / WEIGHTS))      # stored once
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
    stored = load_file(str(out / WEIGHTS))
    bank = next(v for k, v in stored.items() if k.endswith("bank.gate"))
    adapters = next(v for k, v in stored.items() if k.endswith("adapters.up"))
    assert bank.dtype == adapters.dtype == torch.bfloat16
    assert not (out / "banks.safetensors").exists()                          # the factors are stored once
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < sum(f.stat().st_size for f in path.glob("*.safetensors"))   # smaller than the source on disk


def test_format_1_checkpoints_still_load(tmp_path, tiny_checkpoint):
    """A checkpoint written by the previous layout (marker + globe_model.safetensors + banks.safetensors)."""
    from globe.export.compressed import runtime_state_dict
    from globe.formats.checkpoint import MARKER_FILE, WEIGHTS_FILE
    from globe.export.files import unique_tensors
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    out = tmp_path / "old"
    model = load_model(path)
    save(result, out, dtype=torch.float32)
    save_file(unique_tensors(runtime_state_dict(model, set(result.families))), str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    model.config.save_pretrained(out)
    (out / MARKER_FILE).write_text(json.dumps({"format_version": 1, "weights": WEIGHTS_FILE, "dtype": "float32",
                                               "globe_dtype": "float32", "families": ["gate", "up"]}))
    assert is_compressed(out)
    loaded = load_compressed(out, mode="factored")
    assert torch.equal(_logits(loaded), _logits(apply_globe(load_model(path), result, mode="factored")))


def test_the_artifact_is_read_back_from_a_compressed_checkpoint(tmp_path, tiny_checkpoint):
    from globe.export import load_artifact
    path = tiny_checkpoint("deepseek_v3", dtype=torch.bfloat16)
    artifact = load(save(quick_fit(path), tmp_path / "art"))
    out = save_compressed(path, artifact, tmp_path / "c")
    back = load_artifact(out)
    assert set(back.families) == set(artifact.families) and back.metrics == artifact.metrics
    for name, fam in artifact.families.items():
        order = [fam.ids.tolist().index(row) for row in back.families[name].ids.tolist()]
        assert torch.equal(back.families[name].reconstruct(), fam.reconstruct(torch.tensor(order)))


@pytest.mark.parametrize("key_part", [".bank.gate", ".adapters.up"])
def test_plain_from_pretrained_refuses_nan_in_the_factors(tmp_path, tiny_checkpoint, key_part):
    from globe.errors import NumericalError
    path = tiny_checkpoint("qwen2_moe")
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    tensors = load_file(str(out / WEIGHTS))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(NumericalError, match=rf"{key_part.lstrip('.')}.*NaN/Inf"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
