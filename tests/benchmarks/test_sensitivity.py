"""benchmarks/sensitivity.py: each row is `globe compress [--total-cut C]` + the variant's options, through the
command's parser and config, scored on the same held-out tokens; with the probe the fit records its per-layer
weights, without it none; one JSON rewritten after every row."""
from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_benchmark

bench = load_benchmark("sensitivity")
SHORT = ["--calibration-tokens", "256", "--am-iters", "1", "--varpro-steps", "2", "--activation-steps", "1",
         "--expert-steps", "2"]


@pytest.mark.slow
def test_rows_weight_layers_with_the_probe_only(tmp_path):
    out = tmp_path / "sens.json"
    report = bench.main(["--cuts", "0.3", "--variants", "half", "off", "--eval-tokens", "300", "--out", str(out),
                         "--extra", *SHORT])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"half", "off"}
    on, off = rows["half"], rows["off"]
    assert (on["sensitivity_power"], off["sensitivity_power"]) == (0.5, False)
    layers = len(on["probe_kl"]["gate"])
    assert layers == 6 and all(k > 0 for f in ("gate", "up") for k in on["probe_kl"][f])
    for f in ("gate", "up"):
        assert len(on["weights"][f]) == layers and sum(on["weights"][f]) / layers == pytest.approx(1, rel=1e-4)
        assert off["weights"][f] is None
    assert on["probe_seconds"] > 0 and off["probe_seconds"] is None and off["probe_kl"] is None
    assert on["eval_tokens"] == off["eval_tokens"] > 0                                  # the same tokens
    for r in rows.values():
        assert 0 < r["kl"] < 1 and 0 < r["top1"] <= 1 and r["total_cut_achieved"] == pytest.approx(0.3, abs=0.01)
