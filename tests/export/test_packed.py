"""A quantized fit in the compressed checkpoint: packed integer codes + scales + zeros, not dequantized floats.

The packing round trips exactly (checkpoint -> FitResult gives the fit's own integer codes, scales and zeros); the
loaded model gives the logits of its dequantized dense export in every runtime mode, through load_compressed,
from_pretrained and save_pretrained -> from_pretrained; model.safetensors holds the hand-counted bytes, which the
model card and `globe info` state; packed parts are frozen buffers; ranks per layer combine with packed adapters;
an older globe (format_version 2 only) refuses the file in one line.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

import globe  # noqa: F401  (registers the quantizer)
from globe.errors import ArtifactError
from globe.export import export_dense, load_compressed, load_model, save_compressed
from globe.export.compressed import describe_compressed, load_artifact
from globe.formats.checkpoint import format_version_for
from globe.quant import packed_bytes
from globe.runtime import apply_globe, globe_modules, set_mode
from globe.runtime.packed import PackedTensor, unpack_codes
from tests.helpers.fits import quick_fit
from tests.helpers.quantized import quantized_result
from tests.helpers.tiny_models import TINY
from tests.helpers.logits import fixed_ids, fixed_logits

ARCH = "mixtral"                      # 3 MoE layers x 4 experts, per-expert hub keys
MODES = ("factored", "cached", "dense")


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory):
    """(source, quantized fit, its compressed checkpoint, the logits of its dense export)."""
    path = tiny_checkpoint(ARCH)
    result = quantized_result(quick_fit(path), bits=4, group=3)        # group 3: a short last group along r = 4
    tmp = tmp_path_factory.mktemp("packed")
    comp = save_compressed(path, result, tmp / "c")
    dense = transformers.AutoModelForCausalLM.from_pretrained(export_dense(path, result, tmp / "dense"))
    return path, result, comp, fixed_logits(dense)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_on_device_matches_the_reference_unpacking(bits):
    from globe.quant import pack_bits, unpack_bits
    codes = torch.randint(0, 2 ** bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, 37).long(), unpack_bits(packed, bits, 37))
    assert torch.equal(unpack_codes(packed, bits, 37).long(), codes)


def test_packed_rows_equal_the_rows_of_the_whole_tensor():
    from globe.quant import QuantConfig, quantize
    for shape, bits in (((5, 4, 6), 4), ((5, 3, 5), 3)):          # rows on bytes, and not (3 x 5 x 3 bits)
        qt = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), QuantConfig("rtn", bits, 4))
        part = PackedTensor.from_quantized(qt)
        rows = torch.tensor([4, 1])
        assert torch.equal(part.dequantize(), qt.dequantize())
        assert torch.equal(part.rows(rows), qt.dequantize()[rows])


def test_checkpoint_stores_packed_parts_and_records_them(packed):
    _, result, comp, _ = packed
    quant = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert quant["format_version"] == 3 == format_version_for(quant["families"])
    for name in ("gate", "up"):
        assert quant["families"][name]["quant"] == {"bank": {"bits": 4, "group": 3, "method": "rtn"},
                                                    "adapters": {"bits": 4, "group": 3, "method": "rtn"}}
    stored = load_file(str(comp / "model.safetensors"))
    assert not any(k.endswith((".bank.gate", ".adapters.gate")) for k in stored)             # no float copies
    assert sum(k.endswith(".bank.gate.codes") for k in stored) == 1                           # the bank once
    codes = next(v for k, v in stored.items() if k.endswith(".adapters.up.codes"))
    assert codes.dtype == torch.uint8 and codes.numel() == packed_bytes(TINY.num_experts * TINY.p * 4, 4)
    scales = next(v for k, v in stored.items() if k.endswith(".adapters.up.scales"))
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (TINY.num_experts, TINY.p, 2)


def test_packing_round_trips_exactly_through_the_checkpoint(packed):
    _, result, comp, _ = packed
    back = load_artifact(comp)
    for name, fam in result.families.items():
        got = back.families[name]
        for part in ("bank", "adapters"):
            a, b = fam.quant[part], got.quant[part]
            assert (a.shape, a.bits, a.group) == (b.shape, b.bits, b.group)
            assert torch.equal(a.integer_codes(), b.integer_codes()) and torch.equal(a.codes, b.codes)
            assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        assert torch.equal(got.bank, fam.bank) and torch.equal(got.adapters, fam.adapters)


@pytest.mark.parametrize("mode", MODES)
def test_loaded_checkpoint_gives_the_logits_of_its_dense_export(packed, tmp_path, mode):
    path, result, comp, reference = packed
    loaded = load_compressed(comp, mode=mode, cache_size=2)
    modules = list(globe_modules(loaded).values())
    assert all(isinstance(m.bank["gate"], PackedTensor) and m.bank["gate"] is modules[0].bank["gate"]
               for m in modules)                                                   # one bank object, packed
    assert all(isinstance(m.adapters["up"], PackedTensor) for m in modules)
    torch.testing.assert_close(fixed_logits(loaded), reference, rtol=1e-5, atol=1e-5)
    patched = apply_globe(load_model(path), result, mode=mode, cache_size=2)
    assert torch.equal(fixed_logits(loaded), fixed_logits(patched))
    hf = transformers.AutoModelForCausalLM.from_pretrained(comp)
    set_mode(hf, mode, cache_size=2)
    torch.testing.assert_close(fixed_logits(hf), reference, rtol=1e-5, atol=1e-5)
    hf.save_pretrained(tmp_path / "again")                                          # writes the packed parts back
    assert (comp / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    set_mode(again, mode, cache_size=2)
    assert torch.equal(fixed_logits(again), fixed_logits(hf))
    assert not torch.allclose(fixed_logits(again), fixed_logits(load_model(path)), atol=1e-4)     # a real change


def test_cached_mode_holds_dequantized_adapters_in_its_cache(packed):
    _, _, comp, reference = packed
    model = load_compressed(comp, mode="cached", cache_size=2, collect_stats=True)
    module = next(iter(globe_modules(model).values()))
    assert set(module.cache.families) == {"gate", "up", "gate_adapters", "up_adapters"}
    fixed_logits(model)
    resident = module.cache.resident()
    assert resident
    slot = module.cache.order[resident[-1]]
    assert torch.equal(module.cache.slots("up_adapters")[slot],
                       module.adapters["up"].rows(torch.tensor([resident[-1]]))[0])
    torch.testing.assert_close(fixed_logits(model), reference, rtol=1e-5, atol=1e-5)        # now from the cache


def test_bytes_on_disk_equal_the_hand_count_and_the_card(packed, tiny_model):
    from globe.export.card import model_card, tensor_bytes
    _, result, comp, _ = packed
    model = tiny_model(ARCH)
    routed = {"gate", "up"}
    # non-routed weights: every tensor of the source but the routed gate / up weights (w1 / w3 in mixtral)
    others = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                 if not any(f"experts.{name}" in k for name in ("gate_up_proj",)))
    layers, e, p, d = 3, TINY.num_experts, TINY.p, TINY.d
    hand = others
    for name in routed:
        fam = result.families[name]
        m, r, _ = fam.bank.shape
        k = fam.codes.gt(0).sum(1).max().item()
        hand += packed_bytes(m * r * d, 4) + 2 * 2 * m * r * math.ceil(d / 3)                   # bank, once
        hand += layers * (packed_bytes(e * p * r, 4) + 2 * 2 * e * p * math.ceil(r / 3))      # adapters
        hand += layers * e * k * (4 + 8)                                                       # code values, indices
    disk = (comp / "model.safetensors").stat().st_size
    with open(comp / "model.safetensors", "rb") as fh:
        header = 8 + int.from_bytes(fh.read(8), "little")           # the JSON header: names, shapes, offsets
    assert sum(tensor_bytes(comp).values()) == hand                 # the tensors' bytes, exactly
    assert disk == hand + header                                    # (the tiny model's header is ~14 % of it)
    info = describe_compressed(comp)
    assert info["bytes_on_disk"] == disk
    card = model_card(result, comp)
    stated = int(card.split("| memory when loaded: weights | | ")[1].split(" |")[0].replace(",", ""))
    assert stated == hand
    row = "packed quantized factors (dequantized on use; the cache holds dequantized ones) | | "
    packed_stated = int(card.split(row)[1].split(" |")[0].replace(",", ""))
    assert packed_stated == describe_compressed(comp)["packed_bytes"] < hand
    unquantized = save_compressed(tiny_model(ARCH), quick_fit(packed[0]), comp.parent / "bf")
    assert disk < (unquantized / "model.safetensors").stat().st_size


def test_packed_parts_are_frozen_buffers_and_the_rest_trains(packed):
    _, _, comp, _ = packed
    model = load_compressed(comp, mode="factored")
    module = next(iter(globe_modules(model).values()))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith((".codes", ".scales", ".zeros")) for n in names)
    assert any(n.endswith("code_values.gate") for n in names)
    model.train()
    loss = model(input_ids=fixed_ids(), labels=fixed_ids(), use_cache=False).loss
    loss.backward()
    assert module.code_values["gate"].grad is not None and module.code_values["gate"].grad.abs().sum() > 0
    assert module.bank["gate"].codes.grad is None


def test_info_and_card_say_the_parts_are_stored_packed(packed):
    from globe.cli.info import format_compressed
    from globe.export.card import model_card
    _, result, comp, _ = packed
    text = format_compressed(describe_compressed(comp))
    assert "stored packed: adapters 4-bit group 3 (rtn), bank 4-bit group 3 (rtn)" in text
    assert "packed" in text and describe_compressed(comp)["packed_bytes"] > 0
    card = model_card(result, comp)
    assert "this checkpoint stores them packed" in card and "packed quantized factors" in card


def test_an_older_globe_refuses_a_packed_checkpoint_in_one_line(packed, monkeypatch):
    import globe.formats.checkpoint as checkpoint
    from globe.formats import validate
    _, _, comp, _ = packed
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)                     # what globe before this format reads
    validate._VALID.clear()
    with pytest.raises(ArtifactError, match=r"format_version 3; this globe reads 2\.\.2: upgrade globe"):
        load_compressed(comp)
    with pytest.raises(ArtifactError, match=r"format_version 3; this globe reads 2\.\.2: upgrade globe"):
        transformers.AutoModelForCausalLM.from_pretrained(comp)
    validate._VALID.clear()


@pytest.mark.parametrize("mode", MODES)
def test_ranks_per_layer_with_packed_adapters(tiny_checkpoint, tmp_path, mode):
    path = tiny_checkpoint(ARCH)
    full = quick_fit(path)
    ranked = type(full)(families={n: f.with_ranks((4, 1, 3)) for n, f in full.families.items()},
                        config=full.config, source=full.source)
    result = quantized_result(ranked, bits=3, group=2)
    dense = export_dense(path, result, tmp_path / "d")
    reference = fixed_logits(transformers.AutoModelForCausalLM.from_pretrained(dense))
    comp = save_compressed(path, result, tmp_path / "c")
    quant = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert quant["format_version"] == 3 and quant["families"]["gate"]["ranks"] == {"0": 4, "1": 1, "2": 3}
    loaded = load_compressed(comp, mode=mode, cache_size=2)
    assert [m.rank("up") for m in globe_modules(loaded).values()] == [4, 1, 3]
    assert globe_modules(loaded)[1].adapters["up"].shape == (TINY.num_experts, TINY.p, 1)
    torch.testing.assert_close(fixed_logits(loaded), reference, rtol=1e-5, atol=1e-5)
    back = load_artifact(comp)
    assert torch.equal(back.families["gate"].reconstruct(), result.families["gate"].reconstruct())


def test_bf16_dense_export_equals_the_loaded_checkpoints_reconstruction(tiny_checkpoint, tmp_path):
    """In bf16 the packed parts are not rounded to bf16 before the product (they are stored as codes and scales):
    the dense export of the fit and of the loaded checkpoint hold the same weights, bit for bit."""
    from globe.export.dense import dense_state_dict
    path = tiny_checkpoint(ARCH, dtype=torch.bfloat16)
    result = quantized_result(quick_fit(path), bits=4, group=3)
    comp = save_compressed(path, result, tmp_path / "c")
    loaded = load_compressed(comp, mode="dense")
    from_fit = dense_state_dict(load_model(path), result)
    from_checkpoint = dense_state_dict(loaded, load_artifact(comp))
    experts = [k for k in from_fit if ".experts." in k]
    assert experts and all(torch.equal(from_fit[k], from_checkpoint[k]) for k in experts)
    module = next(iter(globe_modules(loaded).values()))
    assert module.dense_weight("gate").dtype == torch.bfloat16


def test_stock_from_pretrained_without_import_globe_loads_the_packed_checkpoint(packed, tmp_path):
    import shutil
    import subprocess
    import sys
    from tests.export.test_autoload import STOCK, _reference_loss
    from tests.helpers.subproc import REPO, subprocess_env
    _, _, comp, _ = packed
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "globe-autoload.pth", site)
    proc = subprocess.run([sys.executable, "-c", STOCK.format(site=str(site), path=str(comp))],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["{'GlobeExperts'}", str(_reference_loss(comp))]


def test_dtype_casts_of_the_model_leave_the_packed_parts_exact(packed):
    _, _, comp, _ = packed
    model = load_compressed(comp, mode="factored")
    part = next(iter(globe_modules(model).values())).adapters["gate"]
    before = part.dequantize()
    model.to(torch.bfloat16)
    assert part.scales.dtype == torch.float16 and part.codes.dtype == torch.uint8
    assert torch.equal(part.dequantize(), before)
    assert next(iter(globe_modules(model).values())).code_values["gate"].dtype == torch.bfloat16
    assert torch.isfinite(fixed_logits(model)).all()


def test_memory_states_packed_bytes_and_the_dequantized_cache(packed):
    from globe.eval.evaluate import memory_breakdown
    from globe.runtime.memory import held_breakdown, held_packed_bytes, slot_bytes
    _, _, comp, _ = packed
    model = load_compressed(comp, mode="cached", cache_size=2)
    modules = list(globe_modules(model).values())
    assert held_packed_bytes(model) == describe_compressed(comp)["packed_bytes"]          # the bank counted once
    e, p, r, itemsize = TINY.num_experts, TINY.p, 4, 4
    assert slot_bytes(modules[0]) == 2 * (r * TINY.d + p * r) * itemsize                  # atoms + adapters
    assert held_breakdown(model)["caches"] == sum(2 * slot_bytes(m) for m in modules)
    assert memory_breakdown(model, 1000.0)["packed_mb"] == held_packed_bytes(model) / 2 ** 20
    fixed_logits(model)                                   # the cached mode keeps the shared bank dequantized, once
    bank = modules[0].bank["gate"]
    assert bank.kept() is not None and bank.dequantize(bank.kept().dtype) is bank.kept()
    m = bank.shape[0]
    assert held_breakdown(model)["caches"] == sum(2 * slot_bytes(mod) for mod in modules) + 2 * m * r * TINY.d * 4
    set_mode(model, "factored")
    assert bank.kept() is None and held_breakdown(model)["caches"] == 0
