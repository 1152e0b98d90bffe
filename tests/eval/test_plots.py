"""globe.eval.plots: the PNG report of an artifact and of a budget sweep."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

import globe
from globe.errors import ArtifactError
from globe.eval.plots import UNKNOWN, check_sweep_model, figures, sweep_points, write_plots
from tests.helpers.fits import quick_fit

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = {"families": {"gate": [
    {"budget": 0.5, "dense_params": 1000, "svd": {"params": 500, "rel_err": 0.3},
     "per_layer_bank": {"params": 480, "rel_err": 0.33},
     "globe": [{"params": 490, "rel_err": 0.25}, {"params": 495, "rel_err": 0.22}]},
    {"budget": 0.25, "dense_params": 1000, "svd": {"params": 250, "rel_err": 0.45},
     "globe": [{"params": 240, "rel_err": 0.36}]}]}}


@pytest.fixture
def result(tiny_checkpoint):
    return quick_fit(tiny_checkpoint("qwen2_moe"))


def sweep_of(result) -> dict:
    """SWEEP naming the artifact's model as `globe sweep` does."""
    return {**copy.deepcopy(SWEEP), "model": {"model_dir": result.source["model_dir"], "name": "x",
                                              "content_hash": result.source["content_hash"]}}


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
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_sweep_points_pick_the_best_globe_run():
    points = sweep_points(SWEEP)
    assert points["svd (gate)"] == [(0.25, 0.45), (0.5, 0.3)]
    assert points["GloBE sweep (gate)"] == [(0.24, 0.36), (0.495, 0.22)]
    assert points["MoBE (gate)"] == [(0.48, 0.33)]                    # the old key of older benchmark files


def test_sweep_points_read_mobe_once():
    sweep = copy.deepcopy(SWEEP)
    row = sweep["families"]["gate"][0]
    row["mobe"] = {"params": 470, "rel_err": 0.31}                    # files that have both keys: "mobe" wins
    assert sweep_points(sweep)["MoBE (gate)"] == [(0.47, 0.31)]
    assert not any("per_layer_bank" in name for name in sweep_points(sweep))


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="nothing to plot"):
        write_plots(tmp_path)


def test_without_a_sweep_no_error_vs_budget_and_says_why(result, caplog):
    with caplog.at_level(logging.INFO, logger="globe.eval.plots"):
        figs = figures(result)
    assert "error_vs_budget.png" not in figs and "support_hist.png" in figs
    assert any("no error_vs_budget.png" in r.message and "globe sweep" in r.message for r in caplog.records)


def test_every_figure_has_a_title_with_model_and_family_and_no_offset(result):
    model = Path(result.source["model_dir"]).name
    for name, fig in figures(result, sweep_of(result)).items():
        title = fig.axes[0].get_title()
        assert model in title and "gate" in title, (name, title)
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                fmt = axis.get_major_formatter()
                if hasattr(fmt, "get_useOffset"):
                    assert fmt.get_useOffset() is False, name
        fig.clf()


def test_support_histogram_integer_ticks_and_target_line(result):
    fig = figures(result)["support_hist.png"]
    ax = fig.axes[0]
    fig.canvas.draw()
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert all(float(t).is_integer() for t in ticks), ticks
    target = result.config.sparsity.target_support
    lines = [l for l in ax.get_lines() if l.get_label() == f"target support {target}"]
    assert len(lines) == 1 and set(lines[0].get_xdata()) == {target}


def test_am_history_plots_median_support_against_the_target(result):
    fig = figures(result)["am_history.png"]
    support_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "median support")
    gate = next(l for l in support_ax.get_lines() if l.get_label() == "gate")
    assert list(gate.get_ydata()) == [row["median_support"] for row in result.families["gate"].history["am"]]
    target = next(l for l in support_ax.get_lines() if l.get_label().startswith("target"))
    assert target.get_linestyle() == "--" and set(target.get_ydata()) == {result.config.sparsity.target_support}


def test_sweep_of_another_model_is_refused(result, tmp_path):
    sweep = sweep_of(result)
    sweep["model"]["content_hash"] = "0" * 32
    path = tmp_path / "other.json"
    path.write_text(json.dumps(sweep))
    with pytest.raises(ArtifactError, match=f"sweep {path} is of .*not of the artifact's model"):
        write_plots(tmp_path / "plots", artifact=result, sweep=path)
    assert not (tmp_path / "plots").exists()                          # refused before anything is written


def test_sweep_model_by_directory_when_no_hash(result, tmp_path):
    source = {k: v for k, v in result.source.items() if k != "content_hash"}
    assert check_sweep_model({"model": result.source["model_dir"]}, source, "old.json") == ""   # older files
    with pytest.raises(ArtifactError, match="old.json"):
        check_sweep_model({"model": str(tmp_path)}, source, "old.json")


def test_sweep_hash_checked_against_an_artifact_without_one(result):
    source = {k: v for k, v in result.source.items() if k != "content_hash"}  # hashed from its model dir
    assert check_sweep_model(sweep_of(result), source, "s.json") == ""
    other = sweep_of(result)
    other["model"]["content_hash"] = "f" * 32
    with pytest.raises(ArtifactError, match="s.json"):
        check_sweep_model(other, source, "s.json")


def test_sweep_without_model_is_drawn_labelled_unknown(result, caplog):
    with caplog.at_level(logging.WARNING, logger="globe.eval.plots"):
        fig = figures(result, copy.deepcopy(SWEEP), "old.json")["error_vs_budget.png"]
    labels = [l.get_label() for l in fig.axes[0].get_lines()]
    assert labels and all(label.endswith(UNKNOWN) for label in labels)
    assert any("old.json names no model" in r.message for r in caplog.records)
    matched = figures(result, sweep_of(result))["error_vs_budget.png"]
    assert not any(UNKNOWN in l.get_label() for l in matched.axes[0].get_lines())
