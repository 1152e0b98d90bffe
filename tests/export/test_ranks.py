"""A rank per layer (globe.core.shape.BankShape): a fit whose layers have different ranks survives save / load,
the compressed checkpoint (save_compressed, from_pretrained, save_pretrained) and every runtime mode, with logits
equal to the model holding the dense reconstruction; only the real adapter columns are stored; the parameter count
is the hand count."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import globe  # noqa: F401  (registers the quantizer)
from globe.artifact import load, save
from globe.core.shape import BankShape
from globe.export import export_dense, load_model, save_compressed
from globe.cli.info import format_compressed
from globe.export.compressed import describe_compressed, load_compressed
from globe.runtime import apply_globe, globe_modules, set_mode
from tests.helpers.fits import quick_fit
from tests.helpers.tiny_models import TINY
from tests.helpers.logits import fixed_ids, fixed_logits

ARCH = "mixtral"                                   # 3 MoE layers, 4 experts each
RANKS = (4, 1, 3)                                  # r_max = 4 = the quick fit's r


@pytest.fixture(scope="module")
def ranked(tiny_checkpoint):
    path = tiny_checkpoint(ARCH)
    full = quick_fit(path)
    result = type(full)(families={n: f.with_ranks(RANKS) for n, f in full.families.items()}, config=full.config,
                        source=full.source)
    return path, full, result


def test_parameter_count_is_the_hand_count(ranked):
    _, full, result = ranked
    fam = result.families["gate"]
    m, r_max, (n, p, d) = fam.bank.shape[0], fam.bank.shape[1], (fam.adapters.shape[0], TINY.p, TINY.d)
    nnz = int((fam.codes != 0).sum())
    hand = m * r_max * d + TINY.num_experts * p * (4 + 1 + 3) + nnz + n
    assert fam.param_count()["stored"] == hand
    assert fam.param_count()["adapters"] == TINY.num_experts * p * 8
    assert full.families["gate"].param_count()["stored"] - hand == TINY.num_experts * p * (3 + 1)
    assert fam.bank_shape == BankShape(m, RANKS) and fam.shape["ranks"] == list(RANKS)
    assert BankShape.uniform(m, 4, 3).params((4, 4, 4), p, d, nnz) == full.families["gate"].param_count()["stored"]


def test_artifact_stores_only_the_real_columns_and_round_trips(tmp_path, ranked):
    _, _, result = ranked
    out = save(result, tmp_path / "a", dtype=torch.float32)
    doc = json.loads((out / "globe_config.json").read_text())
    assert doc["format_version"] == 2 and doc["families"]["gate"]["ranks"] == list(RANKS)
    with safe_open(str(out / "banks.safetensors"), "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert "gate.adapters" not in shapes
    assert [shapes[f"gate.adapters.{layer}"] for layer in range(3)] == [(TINY.num_experts, TINY.p, r) for r in RANKS]
    back = load(out)
    for name, fam in result.families.items():
        assert back.families[name].ranks == RANKS
        assert torch.equal(back.families[name].adapters, fam.adapters)
        assert torch.equal(back.families[name].reconstruct(), fam.reconstruct())


def test_uniform_artifact_keeps_format_1(tmp_path, ranked):
    _, full, _ = ranked
    out = save(full, tmp_path / "u")
    assert json.loads((out / "globe_config.json").read_text())["format_version"] == 1
    with safe_open(str(out / "banks.safetensors"), "pt") as fh:
        assert "gate.adapters" in fh.keys() and fh.metadata()["format_version"] == "1"


@pytest.mark.parametrize("mode", ["factored", "cached", "dense"])
def test_every_mode_and_the_checkpoint_equal_the_dense_reconstruction(tmp_path, ranked, mode):
    path, full, result = ranked
    dense_dir = export_dense(path, result, tmp_path / "dense")
    reference = fixed_logits(transformers.AutoModelForCausalLM.from_pretrained(dense_dir))
    patched = apply_globe(load_model(path), result, mode=mode, cache_size=2)
    assert {m.layer: m.rank("gate") for m in globe_modules(patched).values()} == dict(zip(range(3), RANKS))
    assert tuple(globe_modules(patched)[1].adapters["up"].shape) == (TINY.num_experts, TINY.p, 1)
    torch.testing.assert_close(fixed_logits(patched), reference, rtol=1e-4, atol=1e-5)
    full_logits = fixed_logits(apply_globe(load_model(path), full, mode=mode, cache_size=2))
    assert not torch.allclose(full_logits, reference, atol=1e-4)                 # the ranks change the model

    save_compressed(path, result, tmp_path / "c")
    quant = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert "ranks per layer 0:4, 1:1, 2:3" in format_compressed(describe_compressed(tmp_path / "c"))   # globe info
    assert quant["format_version"] == 3 and quant["families"]["gate"]["ranks"] == {"0": 4, "1": 1, "2": 3}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    set_mode(loaded, mode, cache_size=2)
    torch.testing.assert_close(fixed_logits(loaded), reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(fixed_logits(loaded), fixed_logits(patched))
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    again = load_compressed(tmp_path / "again", mode=mode, cache_size=2)
    assert torch.equal(fixed_logits(again), fixed_logits(patched))


CUT_RANKS = (3, 1, 2)                              # r_max 3 < the fit's 4: the bank cut at the largest rank


@pytest.fixture(scope="module")
def cut_bank(tiny_checkpoint):
    """A rank per layer with the bank cut at the largest rank any layer uses, as the sensitivity rank stage stores
    it (globe.fit.engine.ranks): bank [m, 3, d], adapters [N, p, 3]."""
    import dataclasses
    path = tiny_checkpoint(ARCH)
    full = quick_fit(path)
    top = max(CUT_RANKS)
    fams = {n: dataclasses.replace(f.with_ranks(CUT_RANKS), bank=f.bank[:, :top].clone(),
                                   adapters=f.with_ranks(CUT_RANKS).adapters[:, :, :top].clone())
            for n, f in full.families.items()}
    return path, type(full)(families=fams, config=full.config, source=full.source)


@pytest.mark.parametrize("mode", ["factored", "cached", "dense"])
def test_a_cut_bank_survives_save_load_and_every_mode(tmp_path, cut_bank, mode):
    path, result = cut_bank
    fam = result.families["gate"]
    m, (n, p, d) = fam.bank.shape[0], (fam.adapters.shape[0], TINY.p, TINY.d)
    nnz = int((fam.codes != 0).sum())
    assert fam.param_count()["stored"] == m * 3 * d + TINY.num_experts * p * sum(CUT_RANKS) + nnz + n  # hand count
    back = load(save(result, tmp_path / "a", dtype=torch.float32))
    assert back.families["gate"].ranks == CUT_RANKS and back.families["gate"].bank.shape[1] == 3
    assert back.families["gate"].param_count() == fam.param_count()
    reference = fixed_logits(transformers.AutoModelForCausalLM.from_pretrained(export_dense(path, result,
                                                                                            tmp_path / "dense")))
    patched = apply_globe(load_model(path), back, mode=mode, cache_size=2)
    assert {m.layer: m.rank("gate") for m in globe_modules(patched).values()} == dict(zip(range(3), CUT_RANKS))
    torch.testing.assert_close(fixed_logits(patched), reference, rtol=1e-4, atol=1e-5)
    save_compressed(path, result, tmp_path / "c")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    set_mode(loaded, mode, cache_size=2)
    torch.testing.assert_close(fixed_logits(loaded), reference, rtol=1e-4, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")
    again = load_compressed(tmp_path / "again", mode=mode, cache_size=2)
    assert torch.equal(fixed_logits(again), fixed_logits(loaded))
