"""benchmarks/param_target_bits.py: each row is `globe compress --total-cut C` + the storage's options, through the
command's parser and config, scored on the same held-out tokens; one JSON rewritten after every row."""
from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_benchmark

bench = load_benchmark("param_target_bits")
SHORT = ["--calibration-tokens", "256", "--am-iters", "1", "--varpro-steps", "2", "--activation-steps", "1",
         "--expert-steps", "2"]


@pytest.mark.slow
def test_rows_store_the_asked_bits_on_the_same_tokens(tmp_path):
    out = tmp_path / "bits.json"
    report = bench.main(["--cuts", "0.3", "--storages", "bits8", "no-quant", "--eval-tokens", "300", "--out", str(out),
                         "--extra", *SHORT])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["storage"]: r for r in report["rows"]}
    assert set(rows) == {"bits8", "no-quant"}
    assert (rows["bits8"]["bits"], rows["no-quant"]["bits"]) == (8, None)
    assert rows["bits8"]["quant"]["gate"] == {"bank": "8-bit, groups of 64", "adapters": "8-bit, groups of 64"}
    assert rows["no-quant"]["quant"]["gate"] is None
    assert rows["bits8"]["eval_tokens"] == rows["no-quant"]["eval_tokens"] > 0          # the same tokens
    assert rows["bits8"]["params"] == rows["no-quant"]["params"]                        # a parameter target
    assert rows["bits8"]["family_bytes"]["gate"] < rows["no-quant"]["family_bytes"]["gate"]
    assert rows["bits8"]["total_cut_achieved"] == pytest.approx(0.3, abs=0.01)
    for r in rows.values():
        assert 0 < r["kl"] < 1 and 0 < r["top1"] <= 1 and r["bytes"] < r["source_bytes"]
