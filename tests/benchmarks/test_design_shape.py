"""benchmarks/design_shape.py on a tiny upcycled checkpoint: plan, measured phases, comparison, extrapolation and
the fit -> export -> load -> forward section all land in the JSON."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.scripts import load_benchmark


def test_design_shape_records_plan_fit_and_export(tmp_path: Path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "design.json"
    load_benchmark("make_upcycled").main(["--out", str(ckpt), "--layers", "2", "--experts", "4", "--hidden", "32",
                                          "--intermediate", "16", "--rank", "8"])
    load_benchmark("design_shape").main(["--checkpoint", str(ckpt), "--out", str(out), "--m", "4", "--am-iters", "2",
                                         "--varpro-steps", "1", "--layers", "1", "--export-model-layers", "1", "--trace"])
    result = json.loads(out.read_text())
    assert result["r"] == 8 and result["fit"]["n"] == 4                       # r = p / 2, one layer of 4 experts
    assert result["plan"]["families"][0]["n"] == 4
    assert {"warm_start", "am", "varpro", "finalize"} <= set(result["compare"])
    assert result["compare"]["am"]["traced_gib"] >= 0 and result["fit"]["traced_peak_bytes"] > 0     # --trace
    assert len(result["fit"]["am_seconds_per_iteration"]) == 2 and result["fit"]["varpro_evaluations"] >= 1
    assert result["extrapolated"]["families"] == 3 and result["extrapolated"]["seconds_per_family"] > 0
    export = result["export"]
    assert export["fit_exit"] == 0 and export["export_exit"] == 0 and export["logits_finite"]
