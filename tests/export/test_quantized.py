"""A quantized fit through every consumer: artifact round trip, runtime, compressed and dense exports agree."""
from __future__ import annotations

import pytest
import torch

import globe
from globe.export import export_dense, load_compressed, load_model, save_compressed
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.runtime import apply_globe


def _logits(model) -> torch.Tensor:
    ids = torch.arange(1, 17).view(2, 8) % 60 + 1
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("qwen2_moe")
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=5), quant=QuantSection(bits=4, group=8))
    out = globe.save(globe.fit_model(path, cfg), tmp_path_factory.mktemp("q") / "art")
    return path, out


def test_quantized_artifact_runs_and_exports_like_its_dequantized_factors(quantized, tmp_path):
    import transformers
    path, art = quantized
    result = globe.load(art)
    for fam in result.families.values():
        assert set(fam.quant) == {"bank", "adapters"}
        assert torch.equal(fam.quant["adapters"].dequantize(), fam.adapters)
    patched = apply_globe(load_model(path), result, mode="factored")
    dense = transformers.AutoModelForCausalLM.from_pretrained(export_dense(path, result, tmp_path / "hf"))
    torch.testing.assert_close(_logits(dense), _logits(patched), rtol=1e-4, atol=1e-4)
    compressed = load_compressed(save_compressed(path, result, tmp_path / "c"))
    torch.testing.assert_close(_logits(compressed), _logits(patched), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(patched), _logits(load_model(path)))


def test_model_card_states_bytes_per_family_as_stored(quantized, tmp_path):
    from safetensors.torch import load_file
    from globe.export.card import family_bytes, model_card
    path, art = quantized
    result = globe.load(art)
    out = save_compressed(path, result, tmp_path / "c")
    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    rows = family_bytes(result, out)
    for fam in ("gate", "up"):
        part = {k: k.rsplit(".", 1)[0] if k.endswith((".codes", ".scales", ".zeros")) else k for k in tensors}
        hand = sum(v.numel() * v.element_size() for k, v in tensors.items()
                   if part[k].rsplit(".", 2)[-2:][1] == fam and part[k].rsplit(".", 2)[-2] in (
                       "bank", "adapters", "code_values", "code_indices"))
        assert rows[fam][1] == hand > 0
        assert any(k.endswith(f".bank.{fam}.codes") for k in tensors)                 # stored packed
    card = model_card(result, out)
    assert "bytes of gate (routed experts)" in card and "4-bit group 8" in card


def test_info_of_a_compressed_export_names_the_fit_quantization(quantized, tmp_path):
    from globe.cli.info import format_compressed
    from globe.export.compressed import describe_compressed
    path, art = quantized
    out = save_compressed(path, globe.load(art), tmp_path / "c")
    info = describe_compressed(out)
    assert info["families"]["gate"]["fit_quant"]["adapters"]["bits"] == 4
    assert "adapters 4-bit group 8" in format_compressed(info)


def test_model_card_breaks_loaded_memory_into_weights_and_cache(quantized, tmp_path):
    from safetensors.torch import load_file
    from globe.export.card import model_card
    from globe.formats.checkpoint import read_quant
    path, art = quantized
    out = save_compressed(path, globe.load(art), tmp_path / "c")
    stored = sum(v.numel() * v.element_size() for f in out.glob("*.safetensors") for v in load_file(str(f)).values())
    card = model_card(globe.load(art), out)
    assert f"| memory when loaded: weights | | {stored:,} | |" in card
    cache = read_quant(out)["cache_bytes"]
    if isinstance(cache, int):
        assert f"{cache:,}" in card.split("memory when loaded: cache")[1].splitlines()[0]
    assert "memory when loaded: framework" in card
