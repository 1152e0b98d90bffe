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


PRUNING = [{"method": "reap", "experts_kept": 4, "experts": 8, "bits": None, "group": None, "bits_per_weight": 8.0,
            "kl": 0.9, "top1": 0.5},
           {"method": "reap+gptq", "experts_kept": 6, "experts": 8, "bits": 4, "group": 64, "bits_per_weight": 3.45,
            "kl": 0.3, "top1": 0.7},
           {"method": "reap+gptq", "experts_kept": 4, "experts": 8, "bits": 2, "group": 64, "bits_per_weight": 1.3,
            "kl": 0.95, "top1": 0.4}]


def test_pruning_table_takes_the_best_pruned_row_within_each_size():
    data = {"models": [{"model": {"dir": "x/m"}, "gptq": GPTQ, "pruning": PRUNING}]}
    lines = table.pruning_table(data, [1.0, 2.5, 3.5]).splitlines()
    assert "none fits" in lines[2]                                   # nothing pruned reaches 1 bit
    assert "4/8 experts, GPTQ 2-bit group 64" in lines[3] and "2-bit group 64 | 4.00e-03" in lines[3]
    assert "6/8 experts, GPTQ 4-bit group 64" in lines[4] and "| 0.3 |" in lines[4]    # bf16 pruning (8 bits) never fits


BF16_GLOBE = [{"method": "globe-bf16", "target_bits": 3.0, "bits_per_weight": 2.9, "kl": 0.006, "top1": 0.9}]
BF16_MOBE = [{"method": "mobe-bf16", "target_bits": 3.0, "bits_per_weight": 2.95, "kl": 0.03, "top1": 0.8},
             {"method": "mobe-bf16", "target_bits": 2.0, "bits_per_weight": 1.9, "kl": 0.1, "top1": 0.6}]


def _bf16_entry() -> dict:
    entry = {"model": {"dir": "x/m"}, "gptq": GPTQ, "hqq": HQQ, "product": PRODUCT, "bf16_globe": BF16_GLOBE,
             "bf16_mobe": BF16_MOBE}
    entry["bf16_comparison"] = product.bf16_compare(entry)
    return entry


def test_bf16_rows_meet_the_product_row_and_the_best_quantizer_of_their_size():
    rows = {c["target_bits"]: c for c in _bf16_entry()["bf16_comparison"]}
    assert sorted(rows) == [2.0, 3.0]
    at3 = rows[3.0]
    assert at3["best_quantizer"] == "hqq 2-bit group 32"                 # within 3.0 bits, lower KL than GPTQ's
    assert at3["globe_bf16/product"] == pytest.approx(0.006 / 0.0015)
    assert at3["globe_bf16/best_quantizer"] == pytest.approx(2.0)
    assert at3["mobe/product"] == pytest.approx(20.0) and at3["mobe/best_quantizer"] == pytest.approx(10.0)
    at2 = rows[2.0]                                                      # no GloBE row, no quantizer fits 2 bits
    assert at2["globe_bf16_kl"] is None and at2["globe_bf16/product"] is None
    assert at2["best_quantizer"] is None and at2["mobe/best_quantizer"] is None
    assert at2["mobe/product"] == pytest.approx(10.0)


def test_bf16_table_shows_each_size_and_an_empty_run_shows_none(tmp_path):
    lines = table.bf16_table({"models": [_bf16_entry()]}).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| m | 2.00 | - | - | -x | -x | 1.90 | 1.00e-01 | 10.0x | -x |")
    assert "| 2.90 | 6.00e-03 | 4.0x | 2.0x | 2.95 | 3.00e-02 | 20.0x | 10.0x |" in lines[3]
    assert table.bf16_table({"models": [{"model": {"dir": "x/m"}, "gptq": GPTQ}]}) == ""
    data = {"models": [{**_bf16_entry(), "comparison": product.compare(PRODUCT, GPTQ, HQQ)}]}
    fig = table.product_plot(data, tmp_path / "p.png")                   # the bf16 points drawn beside the rest
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "bf16 GloBE (--no-quant)" in labels and "bf16 MoBE (its best)" in labels
    assert (tmp_path / "p.png").stat().st_size > 0
