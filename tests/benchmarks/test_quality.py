"""benchmarks/quality.py: the installed sweep (globe.eval.sweep) with the MoBE peer added under "mobe"."""
from __future__ import annotations

from benchmarks.quality import add_ratios, with_mobe
from globe.eval.plots import sweep_points
from globe.eval.sweep import SweepSettings, run_sweep


def test_quality_rows_carry_mobe_under_one_key(tiny_checkpoint):
    settings = SweepSettings(budgets=(0.5,), families=("gate",), target_support=2, am_iters=2, varpro_steps=0)
    doc = run_sweep(tiny_checkpoint("qwen2_moe"), settings, extra=with_mobe(epochs=2))
    add_ratios(doc["families"])
    row = doc["families"]["gate"][0]
    assert "per_layer_bank" not in row and row["mobe"]["params"] <= 0.5 * row["dense_params"]
    assert row["ratio_vs_mobe"] == min(g["rel_err"] for g in row["globe"]) / row["mobe"]["rel_err"]
    assert sweep_points(doc)["MoBE (gate)"] == [(row["mobe"]["params"] / row["dense_params"], row["mobe"]["rel_err"])]
