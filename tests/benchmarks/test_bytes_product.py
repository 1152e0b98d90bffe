"""benchmarks/bytes_product.py's comparison and benchmarks/bytes_table.py's product table on made-up rows: each size
against the best GPTQ row within it and the best row of any quantizer (GPTQ, RTN, HQQ) within it."""
from __future__ import annotations

import pytest

from tests.helpers.scripts import load_benchmark

product = load_benchmark("bytes_product")
table = load_benchmark("bytes_table")

GPTQ = [{"method": "gptq", "bits": 2, "group": 64, "bits_per_weight": 2.5, "kl": 0.004, "top1": 0.95, "ppl": 10.2},
        {"method": "gptq", "bits": 3, "group": 64, "bits_per_weight": 3.5, "kl": 0.001, "top1": 0.98, "ppl": 10.1}]
HQQ = [{"method": "hqq", "bits": 2, "group": 32, "bits_per_weight": 3.0, "kl": 0.003, "top1": 0.96, "ppl": 10.15},
       {"method": "hqq", "bits": 4, "group": 32, "bits_per_weight": 5.0, "kl": 0.0001, "top1": 0.99, "ppl": 10.0}]
PRODUCT = [{"target_bits": 3.0, "kind": "factors", "bits_per_weight": 2.9, "kl": 0.0015, "top1": 0.97, "ppl": 10.1,
            "describe": "4-bit factors"},
           {"target_bits": 2.0, "kind": "factors", "bits_per_weight": 1.9, "kl": 0.01, "top1": 0.9, "ppl": 11.0,
            "describe": "4-bit factors"}]


def test_each_size_meets_the_best_quantizer_of_any_kind_within_it():
    rows = product.compare(PRODUCT, GPTQ, HQQ)
    assert rows[0]["gptq"] == "2-bit group 64" and rows[0]["ratio"] == pytest.approx(0.0015 / 0.004)
    assert rows[0]["best_quantizer"] == "hqq 2-bit group 32"             # HQQ fits 3.0 bits and beats GPTQ there
    assert rows[0]["ratio_best_quantizer"] == pytest.approx(0.5)
    assert rows[1]["best_quantizer"] is None and rows[1]["ratio"] is None    # below every quantizer's size


def test_product_table_names_the_best_quantizer_and_both_ratios():
    data = {"models": [{"model": {"dir": "x/m"}, "gptq": GPTQ, "hqq": HQQ, "product": PRODUCT,
                        "comparison": product.compare(PRODUCT, GPTQ, HQQ)}]}
    lines = table.product_table(data).splitlines()
    assert len(lines) == 4
    assert "hqq 2-bit group 32 (3.00 bits)" in lines[2] and "**0.50**" in lines[2] and "| 0.38 |" in lines[2]
    assert "none fits" in lines[3]
