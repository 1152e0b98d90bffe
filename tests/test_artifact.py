"""Artifact directory: bit-exact round trips, atomic files, clear errors on damaged or newer artifacts."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import globe
from globe.artifact import check_compatible
from globe.formats.artifact import BANKS_FILE, CONFIG_FILE, csr_to_codes, codes_to_csr
from globe.errors import ArtifactError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.io import model_shape
from globe.runtime import apply_globe
from tests.helpers.fits import exact_result
from tests.helpers.planted import make_planted


@pytest.fixture(scope="module")
def result():
    planted = make_planted(n=24, k=2, seed=7)
    cfg = FitConfig(bank=BankConfig(m=8, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=5))
    fam = globe.fit_family(planted.weights, planted.ids, cfg, "gate")
    return globe.FitResult(families={"gate": fam}, config=cfg, source={"model_type": "planted"})


def test_round_trip_is_bit_exact(tmp_path, result):
    globe.save(result, tmp_path / "a")
    back = globe.load(tmp_path / "a")
    a, b = result.families["gate"], back.families["gate"]
    for name in ("bank", "codes", "adapters", "scales", "ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert back.config == result.config and back.params == result.params
    assert not list((tmp_path / "a").glob(".*.tmp"))       # no temp files left behind
    doc = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert doc["params"]["gate"] < doc["params"]["dense_gate"] and "rel_err" in doc["metrics"]["gate"]


def test_csr_codes_round_trip():
    codes = torch.rand(30, 9) * (torch.rand(30, 9) < 0.3)
    assert torch.equal(csr_to_codes(**codes_to_csr(codes), m=9), codes)


def test_newer_truncated_and_mismatched_artifacts_are_rejected(tmp_path, result):
    out = globe.save(result, tmp_path / "b")
    doc = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99.*upgrade"):
        globe.load(out)
    (out / CONFIG_FILE).write_text(json.dumps({**doc, "families": {"gate": {**doc["families"]["gate"], "r": 5}}}))
    with pytest.raises(ArtifactError, match="gate.bank has shape"):
        globe.load(out)
    (out / CONFIG_FILE).write_text(json.dumps(doc))
    data = (out / BANKS_FILE).read_bytes()
    (out / BANKS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        globe.load(out)
    with pytest.raises(ArtifactError, match="not found"):
        globe.load(tmp_path / "nothing")


def test_fit_history_round_trips(tmp_path, result):
    globe.save(result, tmp_path / "h")
    history = globe.load(tmp_path / "h").families["gate"].history
    assert history == result.families["gate"].history
    assert len(history["am"]) == 3 and {"rel_err", "temperature", "median_support"} <= set(history["am"][0])
    assert len(history["varpro"]) >= 1


def test_compatibility_is_one_check_for_directories_and_loaded_models(tiny_model, tiny_checkpoint):
    model = tiny_model("mixtral")
    result = exact_result(model)
    check_compatible(result, tiny_checkpoint("mixtral"))                           # fits: no error
    check_compatible(result, model_shape(model))
    with pytest.raises(ArtifactError, match="fitted on a mixtral model but .* is qwen2_moe"):
        check_compatible(result, tiny_checkpoint("qwen2_moe"))
    patched = apply_globe(copy.deepcopy(model), exact_result(model, ("up",)), mode="factored")
    with pytest.raises(ArtifactError, match=r"factors \['up'\] but the artifact holds \['gate', 'up'\]"):
        check_compatible(result, model_shape(patched))
    odd = dataclasses.replace(result, families={"gate_up": result.families["gate"]})
    with pytest.raises(ArtifactError, match="not a subset of"):
        check_compatible(odd, model_shape(model))
    gate = result.families["gate"]
    short = dataclasses.replace(result, families={"gate": dataclasses.replace(gate, ids=gate.ids[:-1])})
    with pytest.raises(ArtifactError, match="covers MoE layers"):
        check_compatible(short, model_shape(model))
