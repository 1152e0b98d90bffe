"""The expert phase (globe.fit.engine.expert): gate and up refined together on the whole expert's output."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from globe.calibration.routed import RoutedSamples
from globe.core.result import FamilyFit
from globe.errors import ConfigError
from globe.fit.engine.expert import expert_stage
from globe.fit.expert_config import ExpertConfig
from globe.fit.objectives.expert_output import expert_data, output_loss
from tests.helpers.planted import make_planted

N, P, D, H, S = 16, 24, 20, 20, 48


def planted_problem(seed: int = 0, noise: float = 0.3):
    """Original gate / up exactly representable (planted factors), the fit's factors those plus noise, a random
    down and routed samples of 2 layers x 8 experts."""
    gen = torch.Generator().manual_seed(seed + 100)
    families, weights = {}, {}
    for k, family in enumerate(("gate", "up")):
        planted = make_planted(n=N, p=P, d=D, m=6, r=6, k=2, seed=seed + k)
        weights[family] = planted.weights / planted.weights.flatten(1).norm(dim=1).mean() * 4
        scale = weights[family].flatten(1).norm(dim=1).mean() / planted.weights.flatten(1).norm(dim=1).mean()
        adapters = planted.adapters * scale
        families[family] = FamilyFit(
            family=family, bank=planted.bank + noise * torch.randn(planted.bank.shape, generator=gen) / D ** 0.5,
            codes=planted.codes.clone(), adapters=adapters * (1 + noise * torch.randn(adapters.shape, generator=gen)),
            scales=torch.ones(N), ids=planted.ids.clone())
    weights["down"] = torch.randn(N, H, P, generator=gen) / P ** 0.5
    layers = sorted({int(l) for l in families["gate"].ids[:, 0]})
    experts = int(families["gate"].ids[:, 1].max()) + 1
    counts = torch.randint(S // 2, S + 1, (len(layers), experts), generator=gen)
    inputs = torch.randn(len(layers), experts, S, D, generator=gen)
    mask = torch.arange(S)[None, None] < counts[..., None]
    samples = RoutedSamples(layers, inputs * mask[..., None], torch.rand(len(layers), experts, S, generator=gen) * mask,
                            counts, {"activation": "silu"})
    return families, weights, samples


def whole_error(families, weights, samples) -> float:
    data = expert_data(samples, families["gate"].ids, weights["gate"], weights["up"], weights["down"], 0.0)
    return float(output_loss(data, 0, data.n, families["gate"].reconstruct(), families["up"].reconstruct()))


def copies(families):
    return {f: dataclasses.replace(fam, bank=fam.bank.clone(), codes=fam.codes.clone(),
                                   adapters=fam.adapters.clone(), scales=fam.scales.clone(), ids=fam.ids.clone())
            for f, fam in families.items()}


CFG = ExpertConfig(steps=60, lr=0.02, eval_every=5, chunk=5)


def test_the_phase_lowers_the_whole_expert_error_on_a_planted_model():
    families, weights, samples = planted_problem()
    before = whole_error(families, weights, samples)
    refined, info = expert_stage(families, weights, samples, CFG)
    after = whole_error(refined, weights, samples)
    assert info["accepted"] and info["error_after"] < info["error_before"]
    assert after < 0.7 * before, (before, after)
    batched, _ = expert_stage(families, weights, samples, dataclasses.replace(CFG, batch=16))
    assert whole_error(batched, weights, samples) < 0.8 * before


def test_untouched_inputs_and_parameters_stay_bit_identical():
    families, weights, samples = planted_problem()
    fams0, weights0 = copies(families), {k: v.clone() for k, v in weights.items()}
    planted = make_planted(n=N, p=H, d=P, m=6, r=6, k=2, seed=7)                # a family the phase never trains
    families["down"] = FamilyFit(family="down", bank=planted.bank, codes=planted.codes, adapters=planted.adapters,
                                 scales=torch.ones(N), ids=planted.ids)
    refined, _ = expert_stage(families, weights, samples, CFG)
    for name, tensor in weights.items():                                       # the original weights are only read
        assert torch.equal(tensor, weights0[name])
    for f in ("gate", "up"):                                                   # the inputs are not modified
        for part in ("bank", "codes", "adapters", "scales", "ids"):
            assert torch.equal(getattr(families[f], part), getattr(fams0[f], part))
        assert torch.equal(refined[f].scales, fams0[f].scales) and torch.equal(refined[f].ids, fams0[f].ids)
        assert not torch.equal(refined[f].adapters, fams0[f].adapters)         # ... but the refined ones moved
    assert refined["down"] is families["down"]


def test_same_seed_and_inputs_give_the_same_result_twice():
    families, weights, samples = planted_problem()
    cfg = dataclasses.replace(CFG, batch=16)                                    # drawn minibatches of samples
    one, _ = expert_stage(copies(families), weights, samples, cfg, seed=3)
    two, _ = expert_stage(copies(families), weights, samples, cfg, seed=3)
    other, _ = expert_stage(copies(families), weights, samples, cfg, seed=4)
    for f in ("gate", "up"):
        for part in ("bank", "codes", "adapters"):
            assert torch.equal(getattr(one[f], part), getattr(two[f], part))
    assert not torch.equal(one["gate"].adapters, other["gate"].adapters)       # the seed draws the batches


def test_sparsity_pattern_and_atom_norms_are_kept():
    families, weights, samples = planted_problem()
    refined, _ = expert_stage(families, weights, samples, dataclasses.replace(CFG, lr=0.2))
    for f in ("gate", "up"):
        assert torch.equal(refined[f].codes != 0, families[f].codes != 0)
        assert bool((refined[f].codes >= 0).all())
        assert torch.allclose(refined[f].bank.flatten(1).norm(dim=1), torch.ones(refined[f].bank.shape[0]))


def test_no_better_step_rolls_back():
    families, weights, samples = planted_problem(noise=0.0)                    # already exact: nothing to gain
    weights = {f: families[f].reconstruct() if f != "down" else w for f, w in weights.items()}
    refined, info = expert_stage(families, weights, samples, dataclasses.replace(CFG, steps=5))
    assert not info["accepted"]
    for f in ("gate", "up"):
        assert torch.equal(refined[f].adapters, families[f].adapters)


def test_quantized_families_and_bad_configs_are_refused():
    families, weights, samples = planted_problem()
    with pytest.raises(ConfigError, match="expert-steps"):
        expert_stage(families, weights, samples, ExpertConfig(steps=-1))
    families["gate"].quant = {"bank": object()}
    with pytest.raises(ConfigError, match="before quantization"):
        expert_stage(families, weights, samples, CFG)


def test_compress_runs_the_phase_before_quantization_and_leaves_the_rest_of_the_model_alone(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    import globe.cli.main as cli
    from globe.fit.config import FitConfig
    model_dir = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "out"
    assert cli.main(["compress", str(model_dir), "-o", str(out), "--m", "6", "--r", "8", "--target-support", "3",
                     "--am-iters", "1", "--varpro-steps", "1", "--init", "svd", "--calibration-tokens", "256",
                     "--activation-steps", "2", "--bits", "4", "--quant-group", "16", "--expert-steps", "4",
                     "--device", "cpu"]) == 0
    doc = __import__("json").loads((out / "globe_config.json").read_text())
    config = FitConfig.from_dict(doc["config"])
    assert config.expert.steps == 4 and config.quant.bits == 4
    for family in ("gate", "up"):
        assert doc["metrics"][family]["expert"]["steps"] == 4 and "quant" in doc["metrics"][family]
    original = {}
    for path in model_dir.glob("*.safetensors"):
        original.update(load_file(path))
    compressed = {}
    for path in out.glob("*.safetensors"):
        compressed.update(load_file(path))
    kept = [k for k in original if ".experts." not in k]
    assert kept and all(torch.equal(original[k], compressed[k]) for k in kept)     # bit for bit
    history = doc["history"]["gate"]["expert"]
    assert [r["step"] for r in history][:1] == [0] and all(r["error"] >= 0 for r in history)
    assert cli.main(["info", str(out), "--json"]) == 0            # every tool reads it: the validator takes it
    from globe.export import load_artifact
    assert set(load_artifact(out).families) == {"gate", "up"}


def test_the_expert_section_round_trips_and_is_left_out_at_its_default():
    from globe.fit.config import FitConfig
    assert "expert" not in FitConfig().to_dict()
    cfg = FitConfig()
    cfg.expert.steps, cfg.expert.lr = 7, 0.003
    back = FitConfig.from_dict(cfg.to_dict())
    assert back.expert == cfg.expert
    with pytest.raises(ConfigError, match="expert.samples"):
        FitConfig.from_dict({**cfg.to_dict(), "expert": {"steps": 1, "samples": 1}}).validate()
