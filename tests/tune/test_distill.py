"""Distillation of the compressed parameters (globe.tune.distill) on a tiny random Qwen2-MoE and a quick fit of it:
the KL to the original on held-out token sequences goes down, nothing but the GloBE factors changes, the codes keep
their sparsity pattern, the same seed gives the same factors, and a run that makes things worse is rejected."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.errors import ConfigError
from globe.eval import divergence
from globe.runtime import apply_globe, globe_modules
from globe.tune import DistillConfig, distill
from globe.tune.distill import sequences
from globe.tune.targets import kl_loss, teacher_targets
from tests.helpers.fits import quick_fit

FACTOR_KEYS = (".bank.", ".code_values.", ".adapters.")


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 64, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def planted(tiny_model, tiny_checkpoint):
    """(original model, its quick fit, calibration sequences [16, 32], held-out sequences [8, 32])."""
    return tiny_model("qwen2_moe"), quick_fit(tiny_checkpoint("qwen2_moe")), _ids(16, 32, 1), _ids(8, 32, 2)


def _held_out_kl(original, result, held: torch.Tensor) -> float:
    compressed = apply_globe(copy.deepcopy(original), result, mode="dense")
    return divergence(original, compressed, held.reshape(-1), max_length=32)["kl"]


CFG = DistillConfig(steps=40, lr=3e-2, batch=4, top_k=16, validation=0.25, seed=0)


@pytest.fixture(scope="module")
def distilled(planted):
    original, result, calib, _ = planted
    student = copy.deepcopy(original)
    out, info = distill(student, result, calib, CFG)
    return student, out, info


def test_distillation_lowers_the_held_out_kl(planted, distilled):
    original, result, _, held = planted
    _, out, info = distilled
    before, after = _held_out_kl(original, result, held), _held_out_kl(original, out, held)
    assert info["accepted"] and info["validation_kl_after"] < info["validation_kl_before"]
    assert before > 1e-6 and after < 0.8 * before, (before, after)
    assert out.source["distill"]["config"]["format_version"] == 1


def test_only_the_factors_change_and_the_rest_is_bit_identical(planted, distilled):
    original, result, _, _ = planted
    student, out, _ = distilled
    reference = apply_globe(copy.deepcopy(original), result, mode="factored").state_dict()
    changed = set()
    for key, value in student.state_dict().items():
        if any(k in key for k in FACTOR_KEYS):
            changed.add(key) if not torch.equal(value, reference[key]) else None
        else:
            assert torch.equal(value, reference[key]), key           # attention, router, shared experts, norms, down
    assert any(".bank." in k for k in changed) and any(".adapters." in k for k in changed)
    assert any(".code_values." in k for k in changed)
    for name, fam in result.families.items():                       # the input fit is never modified
        assert not torch.equal(fam.bank, out.families[name].bank)


def test_codes_keep_their_sparsity_pattern(planted, distilled):
    _, result, _, _ = planted
    student, out, _ = distilled
    for name, fam in result.families.items():
        assert torch.equal(fam.codes != 0, out.families[name].codes != 0), name
        assert not torch.equal(fam.codes, out.families[name].codes)
        rank_zero = fam.adapters == 0                                # columns past r_l (and exact zeros) stay zero
        assert torch.equal(out.families[name].adapters[rank_zero.all(1, keepdim=True).expand_as(rank_zero)],
                           fam.adapters[rank_zero.all(1, keepdim=True).expand_as(rank_zero)])
    for module in globe_modules(student).values():                   # padding entries of the runtime codes too
        for name in module.factored:
            assert ((module.code_values[name] != 0).sum(1) <= (result.families[name].codes != 0).sum(1).max()).all()


def test_the_same_seed_gives_the_same_factors(planted, distilled):
    original, result, calib, _ = planted
    _, out, _ = distilled
    again, _ = distill(copy.deepcopy(original), result, calib, CFG)
    for name, fam in out.families.items():
        for part in ("bank", "codes", "adapters"):
            assert torch.equal(getattr(fam, part), getattr(again.families[name], part)), (name, part)


def test_a_run_that_raises_the_validation_kl_is_rejected(planted):
    original, result, calib, _ = planted
    out, info = distill(copy.deepcopy(original), result, calib, DistillConfig(steps=5, lr=10.0, validation=0.25))
    assert not info["accepted"] and info["validation_kl_after"] > info["validation_kl_before"]
    for name, fam in result.families.items():
        assert out.families[name] is fam


def test_zero_steps_is_off(planted):
    original, result, calib, _ = planted
    out, info = distill(original, result, calib, DistillConfig(steps=0))
    assert out is result and info == {"steps": 0} and not globe_modules(original)


def test_top_k_targets_bound_the_full_kl_and_equal_it_with_every_token(planted):
    original, _, calib, _ = planted
    student = copy.deepcopy(original)
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(3.0)
        logits = student(input_ids=calib[:2]).logits
    full = kl_loss(logits, teacher_targets(original, calib[:2], 0, 2))
    top = kl_loss(logits, teacher_targets(original, calib[:2], 8, 2))
    assert 0 < float(top) <= float(full) + 1e-6
    assert float(kl_loss(logits, teacher_targets(original, calib[:2], 64, 2))) == pytest.approx(float(full), rel=1e-4)


def test_a_long_text_is_cut_into_windows():
    assert sequences(torch.arange(10)[None], 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    sampled = torch.zeros(3, 8, dtype=torch.long)
    assert sequences(sampled, 4) is sampled


@pytest.mark.parametrize("field, value, flag", [("steps", -1, "--distill-steps"), ("lr", 0.0, "--distill-lr"),
                                                ("validation", 1.0, "validation"), ("top_k", -2, "top_k")])
def test_bad_settings_name_their_option(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        DistillConfig(**{field: value}).check()


def test_the_config_round_trips_with_its_format_version():
    cfg = DistillConfig(steps=7, lr=2e-3)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="format_version"):
        DistillConfig.from_dict({**cfg.to_dict(), "format_version": 99})


def test_a_quantized_fit_trains_its_code_values_only(planted):
    import dataclasses
    original, result, calib, _ = planted
    from tests.helpers.quantized import quantized_result
    quantized = quantized_result(result)                      # bank and adapters stored packed (4-bit, group 8)
    out, info = distill(copy.deepcopy(original), quantized, calib, dataclasses.replace(CFG, steps=10))
    assert info["trained"] == ["code_values"]
    for name, fam in quantized.families.items():
        assert torch.equal(out.families[name].bank, fam.bank) and torch.equal(out.families[name].adapters,
                                                                              fam.adapters)
        assert out.families[name].quant is fam.quant
        assert torch.equal(out.families[name].codes != 0, fam.codes != 0)
