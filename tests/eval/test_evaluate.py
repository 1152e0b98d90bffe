"""evaluate(): a JSON-serialisable report with perplexity, speed, memory, cache and footprint that add up."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from globe.eval import evaluate, routed_footprint
from globe.export import load_model
from globe.runtime import apply_globe
from tests.helpers.fits import exact_result, quick_fit
from tests.helpers.tiny_models import TINY


def _ids(n: int = 120) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(0))


def test_report_of_a_cached_model(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    model = apply_globe(load_model(path), quick_fit(path), mode="cached", cache_size=2)
    report = evaluate(model, None, _ids(), max_length=32, stride=16, prefill_tokens=32, decode_tokens=4, repeats=1,
                      calibration_text=_ids(40), hit_tokens=20)
    assert json.loads(json.dumps(report)) == report
    assert report["model"]["globe_mode"] == "cached" and report["perplexity"]["tokens"] == 119
    assert report["speed"]["prefill_tok_s"] > 0 and report["speed"]["decode_tok_s"] > 0
    assert report["memory"]["rss_mb"] > 0 and report["memory"]["peak_rss_mb"] >= report["memory"]["rss_mb"]
    assert set(report["warm_up"]) == {"0", "2"} and all(len(v) <= 2 for v in report["warm_up"].values())
    cache = report["cache"]
    assert cache["tokens"] == 20 and cache["hits"] + cache["misses"] == 2 * 20 * TINY.top_k   # 2 MoE layers
    assert 0 < cache["hit_rate"] < 1


def test_compressed_and_original_perplexity_agree_for_an_exact_bank(tiny_model):
    model = tiny_model("deepseek_v2")
    patched = apply_globe(copy.deepcopy(model), exact_result(model), mode="factored")
    a = evaluate(model, None, _ids(), max_length=32, skip_speed=True)
    b = evaluate(patched, None, _ids(), max_length=32, skip_speed=True)
    assert a["cache"] is None and b["cache"] is None and "speed" not in a
    assert b["perplexity"]["perplexity"] == pytest.approx(a["perplexity"]["perplexity"], rel=1e-5)


def test_footprint_counts_the_bank_once(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    before = routed_footprint(load_model(path))
    dense = 2 * TINY.num_experts * 3 * TINY.p * TINY.d                 # 2 MoE layers x E x (gate, up, down)
    assert before["routed_params_before"] == before["routed_params_after"] == dense
    after = routed_footprint(apply_globe(load_model(path), result, mode="dense"))
    n = 2 * TINY.num_experts
    shapes = [f.shape for f in result.families.values()]
    expected = sum(s["m"] * s["r"] * s["d"] + s["N"] * s["p"] * s["r"] for s in shapes)   # banks once + adapters
    expected += sum(n * int((f.codes != 0).sum(1).max()) for f in result.families.values())  # padded code values
    expected += n * TINY.d * TINY.p                                      # dense down projections
    assert after["routed_params_before"] == dense and after["routed_params_after"] == expected
    assert after["runtime_bytes"] == 2 * n * TINY.p * TINY.d * 4         # dense-mode reconstructions (fp32)
    assert after["total_params_before"] - after["total_params_after"] == dense - expected
