"""Round three, class 7: valid but unusual checkpoints compress. A dead (all-zero) expert reconstructs exactly to
zero; a duplicated expert gets exactly the codes and adapters of the expert it copies (so both reconstruct
identically), in weight space and activation-aware; an expert no calibration token reaches is fitted in weight
space (one INFO line); the model card lists all three."""
from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import globe
from globe.cli.main import main
from globe.export import load_artifact
from globe.export.card import model_card, unusual_experts
from globe.fit.objectives.activation import build_whitener
from globe.calibration.stats import load_stats
from tests.helpers.fits import char_tokenizer
from tests.reliability.battery import CALIB, QUICK, TEXT


def _planted(tmp_path, tiny_checkpoint):
    """Layer 0: expert 1 dead, expert 3 a copy of expert 2 (every family, down included)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model)
    tensors = load_file(str(model / "model.safetensors"))
    for key in list(tensors):
        if "layers.0.mlp.experts.1." in key:
            tensors[key] = torch.zeros_like(tensors[key])                       # dead
        if "layers.0.mlp.experts.3." in key:
            tensors[key] = tensors[key.replace(".experts.3.", ".experts.2.")].clone()   # copy of expert 2
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("calibrated", [True, False], ids=["activation-aware", "weight-space"])
def test_dead_and_duplicated_experts_compress(calibrated, tmp_path, tiny_checkpoint):
    model = _planted(tmp_path, tiny_checkpoint)
    extra = [] if calibrated else ["--no-calibration"]
    assert main(["--log-level", "ERROR", "compress", str(model), "-o", str(tmp_path / "c"), *QUICK, *extra]) == 0
    experts = globe.load_compressed(tmp_path / "c", mode="dense").model.layers[0].mlp.experts
    for family in experts.factored:
        weights = experts.reconstruct(family)
        assert torch.equal(weights[1], torch.zeros_like(weights[1]))
        assert torch.isfinite(weights).all()
        assert torch.equal(weights[3], weights[2])                   # the copy reconstructs exactly as its original
    result = load_artifact(tmp_path / "c")
    for name, fam in result.families.items():
        i, j = (fam.ids.tolist().index([0, e]) for e in (2, 3))
        assert torch.equal(fam.codes[i], fam.codes[j]) and torch.equal(fam.adapters[i], fam.adapters[j]), name
    card = (tmp_path / "c" / "README.md").read_text()
    assert "## Unusual experts" in card and "dead: L0E1" in card and "duplicate: L0E3 (= L0E2)" in card


def _unreached_stats(tmp_path, model, expert: int):
    """Statistics of a real calibration run, edited as if no token had been routed to `expert` of the first MoE
    layer (what a router that never picks it produces)."""
    stats = tmp_path / "stats.safetensors"
    (tmp_path / "calib.txt").write_text(TEXT)
    assert main(["--log-level", "ERROR", "calibrate", str(model), "--text", str(tmp_path / "calib.txt"), "-o",
                 str(stats), *CALIB]) == 0
    with safe_open(str(stats), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(stats))
    experts = tensors["routed.counts"].shape[1]
    assert int(tensors["routed.counts"][0, expert]) > 0
    for key, t in tensors.items():
        if key != "hidden.sum" and t.dim() >= 2 and t.shape[1] == experts:
            t[0, expert] = 0
    save_file(tensors, str(stats), metadata=meta)
    return stats


def test_an_expert_no_calibration_token_reaches_is_fitted_in_weight_space(tmp_path, tiny_checkpoint, caplog):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model)
    char_tokenizer(model)
    stats = _unreached_stats(tmp_path, model, expert=2)
    loaded = load_stats(stats)
    whitener = build_whitener(loaded, "gate", torch.tensor([[0, 1], [0, 2]]), loaded.hidden.shape[-1],
                              per_expert=True, damp=0.01, routing_weights=True, unreached_weight_space=True)
    x = torch.randn(2, 3, whitener.factors.shape[-1])
    plain = whitener.select(x, torch.tensor([0, 1]))
    assert torch.allclose(plain[1], x[1] * math.sqrt(1.01))                # R = I (damped): the weight-space objective
    assert not torch.allclose(plain[0], x[0] * math.sqrt(1.01))            # a reached expert keeps its own C
    assert whitener.unreached.tolist() == [False, True]
    caplog.set_level(logging.INFO, logger="globe")
    out = tmp_path / "art"
    assert main(["--log-level", "INFO", "fit", str(model), "-o", str(out), *QUICK, "--calibration", str(stats)]) == 0
    lines = [r.getMessage() for r in caplog.records if "no calibration token reaches" in r.getMessage()]
    assert len(lines) == 2 and all("L0E2" in line for line in lines)       # one INFO line per family
    result = globe.load(out)
    assert {n: f.metrics["unreached"] for n, f in result.families.items()} == {"gate": ["L0E2"], "up": ["L0E2"]}
    assert unusual_experts(result)["gate"]["unreached"] == ["L0E2"]
    card = model_card(result, out)
    assert "unreached: L0E2" in card and "weight space" in card
