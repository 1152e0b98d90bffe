"""globe.eval.sweep: GloBE and per-expert SVD at several budgets, the JSON the error-vs-budget plot draws."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.baselines import rel_err
from benchmarks.baselines.svd import per_expert_svd
from globe.errors import ArtifactError, OutputError
from globe.eval.plots import check_sweep_model, figures
from globe.eval.sweep import SweepSettings, make_sweep, svd_row
from globe.formats.sweep import read_sweep
from tests.helpers.fits import quick_fit

FAST = SweepSettings(budgets=(0.5, 0.3), families=("gate",), target_support=2, am_iters=2, varpro_steps=0)


def test_svd_row_matches_the_reconstruction():
    weights = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(0))
    row = svd_row(weights, 0.4)
    ref = per_expert_svd(weights[None], 0.4)                          # the benchmark's explicit truncation
    assert row["rank"] == ref.info["rank"] and row["params"] == ref.params
    assert row["rel_err"] == pytest.approx(rel_err(weights[None], ref.weights), rel=1e-5)


def test_sweep_names_the_model_and_fits_each_budget(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen2_moe")
    doc = make_sweep(model, tmp_path / "sweep.json", FAST)
    assert read_sweep(tmp_path / "sweep.json") == json.loads(json.dumps(doc))
    artifact = quick_fit(model)
    assert doc["model"]["content_hash"] == artifact.source["content_hash"]
    rows = doc["families"]["gate"]
    assert [row["budget"] for row in rows] == [0.5, 0.3]
    for row in rows:
        assert row["svd"]["params"] <= row["budget"] * row["dense_params"]
        assert 0 < row["globe"][0]["rel_err"] < 1 and 0 < row["svd"]["rel_err"] < 1
    assert rows[1]["svd"]["rel_err"] > rows[0]["svd"]["rel_err"]      # a smaller budget loses more
    assert check_sweep_model(doc, artifact.source, "sweep.json") == ""
    assert "error_vs_budget.png" in figures(artifact, doc, "sweep.json")
    other = quick_fit(tiny_checkpoint("qwen2_moe", seed=1))           # same shapes, other weights
    with pytest.raises(ArtifactError, match="sweep.json"):
        figures(other, doc, "sweep.json")


def test_existing_sweep_is_not_overwritten(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep.json"
    out.write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        make_sweep(tiny_checkpoint("qwen2_moe"), out, FAST)
    assert out.read_text() == "{}"


def test_read_sweep_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match="missing.json does not exist"):
        read_sweep(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="bad.json is not JSON"):
        read_sweep(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"perplexity": 3}')
    with pytest.raises(ArtifactError, match="other.json has no"):
        read_sweep(tmp_path / "other.json")
