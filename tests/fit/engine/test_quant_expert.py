"""The quantized expert phase (globe.fit.engine.quant_expert): the float parts of quantized gate and up trained on
the whole expert's output, the integer codes fixed."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from globe.errors import ConfigError
from globe.fit.engine.quant_expert import quant_expert_stage
from globe.fit.expert_config import ExpertConfig
from globe.fit.solvers.quantized import quantize_factors
from globe.quant import QuantConfig
from tests.fit.engine.test_expert import planted_problem, whole_error

CFG = ExpertConfig(quant_steps=40, quant_lr=0.005, eval_every=5, chunk=5)


def quantized(families, weights, bits: int = 3, group: int = 4):
    """gate and up quantized as the quantize stage stores them (bank GPTQ'd, adapters refitted and GPTQ'd)."""
    out = dict(families)
    for f in ("gate", "up"):
        fam = families[f]
        q = quantize_factors(weights[f], fam.codes, fam.bank, fam.phi, QuantConfig(bits=bits, group=group))
        out[f] = dataclasses.replace(fam, codes=fam.codes.clone(), bank=q.bank.dequantize(),
                                     adapters=q.adapters.dequantize(), quant={"bank": q.bank, "adapters": q.adapters})
    return out


def test_only_the_float_parts_move_and_the_whole_expert_error_drops():
    families, weights, samples = planted_problem(noise=0.1)
    q = quantized(families, weights)
    before = whole_error(q, weights, samples)
    out, info = quant_expert_stage(q, weights, samples, CFG)
    assert info["accepted"] and info["error_after"] < info["error_before"]
    assert whole_error(out, weights, samples) < 0.9 * before
    for f in ("gate", "up"):
        for part in ("bank", "adapters"):
            old, new = q[f].quant[part], out[f].quant[part]
            assert torch.equal(new.codes, old.codes)                                # integer codes bit-identical
            assert torch.equal(new.integer_codes(), old.integer_codes())
            assert new.scales.dtype == new.zeros.dtype == torch.float16 and new.shape == old.shape
            assert not torch.equal(new.scales, old.scales)                          # ... the scales were trained
            assert torch.equal(getattr(out[f], part), new.dequantize())            # what the model computes with
        assert torch.equal(out[f].codes != 0, q[f].codes != 0)                     # sparsity pattern fixed
        assert bool((out[f].codes >= 0).all()) and not torch.equal(out[f].codes, q[f].codes)
        assert torch.equal(out[f].ids, q[f].ids) and torch.equal(out[f].scales, q[f].scales)


def test_code_values_are_stored_in_the_weights_dtype():
    families, weights, samples = planted_problem(noise=0.1)
    out, info = quant_expert_stage(quantized(families, weights), weights, samples, CFG, value_dtype=torch.bfloat16)
    assert info["accepted"]
    for f in ("gate", "up"):
        assert torch.equal(out[f].codes, out[f].codes.to(torch.bfloat16).float())


def test_the_held_out_selection_keeps_the_fit_when_no_step_helps():
    families, weights, samples = planted_problem(noise=0.1)
    q = quantized(families, weights)
    weights = {f: q[f].reconstruct() if f != "down" else w for f, w in weights.items()}   # planted: exact already
    out, info = quant_expert_stage(q, weights, samples, dataclasses.replace(CFG, quant_steps=5))
    assert not info["accepted"] and info["error_before"] == pytest.approx(0.0, abs=1e-9)
    for f in ("gate", "up"):
        assert out[f].quant is q[f].quant and torch.equal(out[f].codes, q[f].codes)
        assert torch.equal(out[f].adapters, q[f].adapters) and torch.equal(out[f].bank, q[f].bank)


def test_same_seed_same_result_twice():
    families, weights, samples = planted_problem(noise=0.1)
    cfg = dataclasses.replace(CFG, batch=16)                                    # drawn minibatches of samples
    one, _ = quant_expert_stage(quantized(families, weights), weights, samples, cfg, seed=3)
    two, _ = quant_expert_stage(quantized(families, weights), weights, samples, cfg, seed=3)
    other, _ = quant_expert_stage(quantized(families, weights), weights, samples, cfg, seed=4)
    for f in ("gate", "up"):
        assert torch.equal(one[f].codes, two[f].codes)
        for part in ("bank", "adapters"):
            for k in ("codes", "scales", "zeros"):
                assert torch.equal(getattr(one[f].quant[part], k), getattr(two[f].quant[part], k))
    assert not torch.equal(one["gate"].quant["adapters"].scales, other["gate"].quant["adapters"].scales)


def test_unquantized_families_and_bad_configs_are_refused():
    families, weights, samples = planted_problem()
    with pytest.raises(ConfigError, match="needs quantized factors"):
        quant_expert_stage(families, weights, samples, CFG)
    with pytest.raises(ConfigError, match="quant-steps"):
        quant_expert_stage(quantized(families, weights), weights, samples, ExpertConfig(quant_steps=-1))


def test_compress_runs_it_after_quantization_and_the_checkpoint_gives_its_dense_export_in_every_mode(
        tmp_path, tiny_checkpoint):
    import json

    import transformers

    import globe.cli.main as cli
    from globe.export import load_compressed
    from globe.export.compressed import load_artifact
    from globe.fit.config import FitConfig
    from globe.runtime import set_mode
    from tests.helpers.logits import fixed_logits
    model_dir = tiny_checkpoint("qwen2_moe")
    common = ["compress", str(model_dir), "--m", "6", "--r", "8", "--target-support", "3", "--am-iters", "1",
              "--varpro-steps", "1", "--init", "svd", "--calibration-tokens", "256", "--activation-steps", "2",
              "--bits", "4", "--quant-group", "4", "--expert-steps", "4", "--device", "cpu"]
    off, out = tmp_path / "off", tmp_path / "out"
    assert cli.main([*common, "-o", str(off), "--quant-steps", "0"]) == 0
    assert cli.main([*common, "-o", str(out), "--quant-steps", "6", "--dense"]) == 0
    doc = json.loads((out / "globe_config.json").read_text())
    assert FitConfig.from_dict(doc["config"]).expert.quant_steps == 6
    info = doc["metrics"]["gate"]["quant_expert"]
    assert info["steps"] == 6 and "quant_expert" not in json.loads((off / "globe_config.json").read_text())["metrics"]["gate"]
    assert "After quantization, the float parts" in (out / "README.md").read_text()
    before, after = load_artifact(off), load_artifact(out)
    for f in ("gate", "up"):                          # the same fit up to the quantize stage: the codes are its own
        for part in ("bank", "adapters"):
            assert torch.equal(before.families[f].quant[part].codes, after.families[f].quant[part].codes)
        assert torch.equal(before.families[f].codes != 0, after.families[f].codes != 0)
    reference = fixed_logits(transformers.AutoModelForCausalLM.from_pretrained(f"{out}-dense"))
    for mode in ("factored", "cached", "dense"):
        torch.testing.assert_close(fixed_logits(load_compressed(out, mode=mode, cache_size=2)), reference,
                                   rtol=1e-5, atol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out)
        set_mode(hf, mode, cache_size=2)
        torch.testing.assert_close(fixed_logits(hf), reference, rtol=1e-5, atol=1e-5)
