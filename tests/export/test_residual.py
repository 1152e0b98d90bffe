"""A fit with quantized residuals through every consumer: artifact, runtime modes, compressed and dense exports,
the validator, `globe info` and the model card's bytes."""
from __future__ import annotations

import json

import pytest
import torch

import globe
from globe.export import export_dense, load_compressed, load_model, save_compressed
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.runtime import apply_globe
from globe.runtime.apply import set_mode


def _logits(model) -> torch.Tensor:
    ids = torch.arange(1, 17).view(2, 8) % 60 + 1
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def residual_fit(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("qwen2_moe")
    cfg = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=5),
                    quant=QuantSection(bits=4, group=8, residual_bits=3, residual_group=16))
    out = globe.save(globe.fit_model(path, cfg), tmp_path_factory.mktemp("r") / "art")
    return path, out


def test_artifact_round_trip_keeps_the_packed_residual_exactly(residual_fit):
    _, art = residual_fit
    result = globe.load(art)
    for fam in result.families.values():
        res = fam.quant["residual"]
        assert res.bits == 3 and res.group == 16 and res.shape == (fam.shape["N"], fam.shape["p"], fam.shape["d"])
        assert fam.metrics["rel_err"] < fam.metrics["rel_err_factors"]
    again = globe.save(result, art.parent / "again")
    from safetensors.torch import load_file
    a, b = load_file(str(art / "banks.safetensors")), load_file(str(again / "banks.safetensors"))
    assert any(k.endswith(".residual.codes") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if ".residual." in k)


def test_residual_checkpoint_gives_the_logits_of_its_dense_export_in_every_mode(residual_fit, tmp_path):
    import transformers
    path, art = residual_fit
    result = globe.load(art)
    dense = transformers.AutoModelForCausalLM.from_pretrained(export_dense(path, result, tmp_path / "hf"))
    want = _logits(dense)
    patched = apply_globe(load_model(path), result, mode="factored")
    for mode in ("factored", "cached", "dense"):
        set_mode(patched, mode, cache_size=2)
        torch.testing.assert_close(_logits(patched), want, rtol=1e-4, atol=1e-4)
    compressed = load_compressed(save_compressed(path, result, tmp_path / "c"))
    torch.testing.assert_close(_logits(compressed), want, rtol=1e-4, atol=1e-4)
    no_residual = globe.load(art)
    for fam in no_residual.families.values():
        del fam.quant["residual"]
    without = _logits(apply_globe(load_model(path), no_residual, mode="factored"))
    original = _logits(load_model(path))
    assert (want - original).abs().mean() < (without - original).abs().mean()        # the residual pays


def test_save_pretrained_round_trip_and_byte_rows(residual_fit, tmp_path):
    from safetensors.torch import load_file
    from globe.export.card import family_bytes
    path, art = residual_fit
    result = globe.load(art)
    out = save_compressed(path, result, tmp_path / "c")
    model = load_compressed(out)
    model.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "again")), _logits(model))
    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    rows = family_bytes(result, out)
    for fam in ("gate", "up"):
        residual = sum(v.numel() * v.element_size() for k, v in tensors.items()
                       if f".residual.{fam}." in k)
        n, p, d = (result.families[fam].shape[k] for k in ("N", "p", "d"))
        by_hand = n * p * d * 3 // 8 + 4 * n * p * (-(-d // 16))       # 3-bit codes + fp16 scale and zero per group
        assert residual == result.families[fam].quant["residual"].nbytes == by_hand
        hand = sum(v.numel() * v.element_size() for k, v in tensors.items()
                   if any(f".{kind}.{fam}" in k for kind in ("bank", "adapters", "code_values", "code_indices",
                                                             "residual")))
        assert rows[fam][1] == hand > residual > 0


def test_validator_refuses_a_tampered_residual_in_one_line(residual_fit, tmp_path):
    from safetensors.torch import load_file, save_file
    from globe.errors import ArtifactError
    from globe.formats.validate import validate_checkpoint_files
    path, art = residual_fit
    out = save_compressed(path, globe.load(art), tmp_path / "c")
    validate_checkpoint_files(out)
    file = next(out.glob("*.safetensors"))
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".residual.gate.scales"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="residual.gate.scales") as err:
        validate_checkpoint_files(out, force=True)
    assert "\n" not in str(err.value)


def test_info_names_the_residual(residual_fit, tmp_path):
    from globe.cli.info import format_compressed
    from globe.export.compressed import describe_compressed
    path, art = residual_fit
    info = describe_compressed(save_compressed(path, globe.load(art), tmp_path / "c"))
    assert info["families"]["gate"]["quant"]["residual"]["bits"] == 3
    assert "residual 3-bit group 16" in format_compressed(info)
    json.dumps(info)


def test_plain_quantization_family_runs_and_exports(tiny_checkpoint, tmp_path):
    """budget 0: every expert stored as its quantized weights with no base (rank 0: empty bank and adapters), through
    artifact, runtime and exports; the model equals its dense export in every mode (also after save_pretrained), and
    its stored bytes are exactly the experts' packed weights (per-expert quantization's bytes), by hand."""
    import transformers
    from safetensors.torch import load_file
    from globe.cli.info import format_compressed
    from globe.export.card import family_bytes
    from globe.export.compressed import describe_compressed
    from globe.fit.engine.quantize import stored_bytes
    from globe.formats.validate import validate_checkpoint_files
    path = tiny_checkpoint("qwen2_moe")
    cfg = FitConfig(bank=BankConfig(budget=0.0), quant=QuantSection(bits=4, group=8, residual_bits=4,
                                                                     residual_group=16))
    art = globe.save(globe.fit_model(path, cfg), tmp_path / "plain")
    result = globe.load(art)
    assert all(f.bank.shape[:2] == (1, 0) and f.adapters.shape[2] == 0 for f in result.families.values())
    dense = transformers.AutoModelForCausalLM.from_pretrained(export_dense(path, result, tmp_path / "hf"))
    want = _logits(dense)
    out = save_compressed(path, result, tmp_path / "c")
    compressed = load_compressed(out)
    for mode in ("factored", "cached", "dense"):
        set_mode(compressed, mode, cache_size=2)
        torch.testing.assert_close(_logits(compressed), want, rtol=1e-4, atol=1e-4)
    compressed.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "again")), want, rtol=1e-4, atol=1e-4)
    assert (want - _logits(load_model(path))).abs().max() < 0.5
    validate_checkpoint_files(out)
    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    rows = family_bytes(result, out)
    for fam in ("gate", "up"):
        n, p, d = (result.families[fam].shape[k] for k in ("N", "p", "d"))
        packed = n * p * d * 4 // 8 + 4 * n * p * (-(-d // 16))        # 4-bit codes + fp16 scale and zero per group
        on_disk = sum(v.numel() * v.element_size() for k, v in tensors.items()
                      if any(f".{kind}.{fam}" in k for kind in ("bank", "adapters", "code_values", "code_indices",
                                                                "residual")))
        assert on_disk == packed                        # no base, no code (k = 0): per-expert GPTQ's bytes
        assert rows[fam][1] == packed, rows[fam]
        assert sum(stored_bytes(result.families[fam], 4).values()) == packed            # the byte model: the same
        assert all(v.shape[-1] == 0 for k, v in tensors.items() if f".code_values.{fam}" in k or
                   f".code_indices.{fam}" in k)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["families"]["gate"]["quant"]["residual"]      # rank 0 without residuals
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(globe.errors.ArtifactError, match="families.gate.r") as err:
        validate_checkpoint_files(out, force=True)
    assert "\n" not in str(err.value)
    info = describe_compressed(tmp_path / "again")
    assert info["families"]["gate"]["quant"]["residual"]["bits"] == 4
    assert "residual 4-bit group 16" in format_compressed(info)
