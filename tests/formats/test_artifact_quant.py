"""Quantized artifacts (format 2): packed bank / adapters round trip exactly; unquantized saves stay format 1."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import globe
from globe.errors import ArtifactError
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig
from globe.formats.artifact import BANKS_FILE, CONFIG_FILE
from tests.helpers.planted import make_planted


def fit(bits):
    planted = make_planted(n=24, p=20, d=40, m=8, r=12, seed=5)
    cfg = FitConfig(bank=BankConfig(m=8, r=12), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=5), quant=QuantSection(bits=bits, group=16))
    fam = globe.fit_family(planted.weights.to(torch.bfloat16), planted.ids, cfg, "gate")
    return globe.FitResult(families={"gate": fam}, config=cfg,
                           source={"model_type": "planted", "inventory": {"dtype": "bfloat16"}})


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_artifact_round_trips_exactly_in_packed_form(tmp_path, bits):
    result = fit(bits)
    out = globe.save(result, tmp_path / "q")
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert doc["format_version"] == 2 and doc["config"]["quant"]["bits"] == bits
    assert doc["families"]["gate"]["quant"]["adapters"] == {"shape": [24, 20, 12], "bits": bits, "group": 16}
    with safe_open(str(out / BANKS_FILE), "pt") as fh:
        keys = set(fh.keys())
        assert "gate.bank" not in keys and "gate.adapters" not in keys
        assert fh.get_tensor("gate.adapters.codes").dtype == torch.uint8
    a, b = result.families["gate"], globe.load(out).families["gate"]
    for name in ("bank", "adapters", "codes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for part in ("bank", "adapters"):
        assert torch.equal(a.quant[part].codes, b.quant[part].codes)
        assert torch.equal(a.quant[part].scales, b.quant[part].scales)
    # the packed parts really are what the file stores: codes = ceil(numel * bits / 8) bytes
    assert b.quant["adapters"].codes.numel() == (24 * 20 * 12 * bits + 7) // 8


def test_unquantized_save_keeps_format_1_and_damaged_quant_metadata_is_rejected(tmp_path):
    plain = globe.save(fit(None), tmp_path / "p")
    assert json.loads((plain / CONFIG_FILE).read_text())["format_version"] == 1
    out = globe.save(fit(4), tmp_path / "q")
    doc = json.loads((out / CONFIG_FILE).read_text())
    doc["families"]["gate"]["quant"]["bank"]["group"] = 5
    (out / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="gate.bank does not fit its metadata"):
        globe.load(out)
