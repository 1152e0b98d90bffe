"""benchmarks/bytes.py's bookkeeping on made-up rows: the quantizers' envelope, the best quantizer at a size, the
comparison at equal or fewer bytes, and the KL / top-1 helper on a model compared with itself and a perturbed one."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.scripts import load_benchmark

bytes_bench = load_benchmark("bytes")

ROWS = [{"method": "rtn", "bits": 2, "bits_per_weight": 2.5, "kl": 0.01},
        {"method": "gptq", "bits": 2, "bits_per_weight": 2.5, "kl": 0.004},
        {"method": "gptq", "bits": 3, "bits_per_weight": 3.5, "kl": 0.001},
        {"method": "rtn", "bits": 4, "bits_per_weight": 4.5, "kl": 0.002},
        {"method": "globe+refit", "budget": 0.35, "bits": 8, "bits_per_weight": 3.0, "kl": 0.0015},
        {"method": "globe", "budget": 0.35, "bits_per_weight": 5.6, "kl": 0.003},
        {"method": "svd-llm+resid", "budget": 0.06, "bits": 2, "bits_per_weight": 2.5, "kl": 0.0001}]


def test_frontier_keeps_only_improvements():
    assert bytes_bench.frontier(ROWS) == [(2.5, 0.004), (3.5, 0.001)]


def test_best_quantizer_interpolates_log_linearly():
    front = bytes_bench.frontier(ROWS)
    assert bytes_bench.best_quantizer_at(front, 2.0) is None
    assert bytes_bench.best_quantizer_at(front, 3.0) == pytest.approx(math.sqrt(0.004 * 0.001))
    assert bytes_bench.best_quantizer_at(front, 9.0) == 0.001


def test_comparison_at_equal_or_fewer_bytes():
    rows = bytes_bench.comparison(ROWS)
    assert [r["bits"] for r in rows] == [2.5, 3.5]
    assert rows[0]["globe"] is None                  # svd-llm+resid rows are not GloBE
    assert rows[1]["globe"] == "globe+refit budget=0.35 bits=8" and rows[1]["ratio"] == pytest.approx(1.5)


def test_kl_top1_is_zero_on_itself_and_positive_when_perturbed():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": self.emb(input_ids)})()

    model, ids = Tiny(), torch.arange(20) % 11
    ref = bytes_bench.log_probs(model, ids, 8)
    assert bytes_bench.kl_top1(model, ids, ref, 8) == {"kl": 0.0, "top1": 1.0}
    with torch.no_grad():
        model.emb.weight.add_(torch.randn(11, 11, generator=torch.Generator().manual_seed(0)))
    got = bytes_bench.kl_top1(model, ids, ref, 8)
    assert got["kl"] > 0.01 and got["top1"] < 1.0
