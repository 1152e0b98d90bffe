"""globe.eval.plots: the PNG report of an artifact and of a budget sweep."""
from __future__ import annotations

import json

import pytest

import globe
from globe.errors import ArtifactError
from globe.eval.plots import sweep_points, write_plots
from tests.helpers.fits import quick_fit

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = {"families": {"gate": [
    {"budget": 0.5, "dense_params": 1000, "svd": {"params": 500, "rel_err": 0.3},
     "per_layer_bank": {"params": 480, "rel_err": 0.33},
     "globe": [{"params": 490, "rel_err": 0.25}, {"params": 495, "rel_err": 0.22}]},
    {"budget": 0.25, "dense_params": 1000, "svd": {"params": 250, "rel_err": 0.45},
     "globe": [{"params": 240, "rel_err": 0.36}]}]}}


def test_artifact_report_has_every_plot(tiny_checkpoint, tmp_path):
    globe.save(quick_fit(tiny_checkpoint("qwen2_moe")), tmp_path / "art")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(SWEEP))
    paths = write_plots(tmp_path / "plots", artifact=tmp_path / "art", sweep=sweep)
    assert [p.name for p in paths] == ["error_vs_budget.png", "per_layer_error.png", "support_hist.png",
                                       "atom_popularity.png", "am_history.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, path.name


def test_sweep_points_pick_the_best_globe_run():
    points = sweep_points(SWEEP)
    assert points["svd (gate)"] == [(0.25, 0.45), (0.5, 0.3)]
    assert points["GloBE sweep (gate)"] == [(0.24, 0.36), (0.495, 0.22)]
    assert points["per_layer_bank (gate)"] == [(0.48, 0.33)]


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="nothing to plot"):
        write_plots(tmp_path)
