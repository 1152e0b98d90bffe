"""routed_footprint of a model loaded from a compressed checkpoint: the routed experts' stored bytes come from the
checkpoint itself (packed integer codes included, which the float parameter counts leave out), before and after."""
from __future__ import annotations

import json
import math

import torch

from globe.cli.eval import format_report
from globe.eval.footprint import checkpoint_footprint, routed_footprint
from globe.export import load_compressed, save_compressed
from tests.helpers.fits import quick_fit
from tests.helpers.quantized import quantized_result
from tests.helpers.tiny_models import TINY

ARCH = "mixtral"                      # 3 MoE layers x 4 experts, per-expert hub keys


def test_a_packed_checkpoint_reports_its_routed_stored_bytes(tiny_checkpoint, tmp_path):
    from globe.quant import packed_bytes
    source = tiny_checkpoint(ARCH)
    result = quantized_result(quick_fit(source), bits=4, group=3)
    comp = save_compressed(source, result, tmp_path / "c")
    layers, e, p, d = 3, TINY.num_experts, TINY.p, TINY.d
    hand = layers * e * d * p * 4                                         # down projections, fp32
    packed = 0
    for fam in result.families.values():
        m, r, _ = fam.bank.shape
        k = fam.codes.gt(0).sum(1).max().item()
        parts = (packed_bytes(m * r * d, 4) + 2 * 2 * m * r * math.ceil(d / 3)      # bank, once
                 + layers * (packed_bytes(e * p * r, 4) + 2 * 2 * e * p * math.ceil(r / 3)))   # adapters
        packed += parts
        hand += parts + layers * e * k * (4 + 8)                                   # code values, indices
    inv = json.loads((comp / "globe_config.json").read_text())["source"]["inventory"]
    before = inv["routed_params"] * getattr(torch, inv["dtype"]).itemsize
    want = {"path": str(comp), "routed_bytes_before": before, "routed_bytes_after": hand, "packed_bytes": packed,
            "routed_ratio": hand / before}
    assert checkpoint_footprint(comp) == want
    model = load_compressed(comp)
    fp = routed_footprint(model)
    assert fp["checkpoint"] == want
    assert fp["routed_bytes_after"] == hand                     # loaded as stored (fp32): held = stored
    half = routed_footprint(load_compressed(comp, dtype=torch.bfloat16))
    assert half["checkpoint"] == want and half["routed_bytes_after"] < hand     # what is held is not what is stored
    report = {"model": {"path": str(comp), "model_type": ARCH, "dtype": "float32", "device": "cpu",
                        "globe_mode": "cached"},
              "perplexity": {"perplexity": 1.0, "tokens": 2, "max_length": 2, "stride": 1}, "footprint": fp,
              "memory": {"rss_mb": 1.0, "peak_rss_mb": 1.0}}
    text = format_report(report)
    assert f"stored       {before:,} -> {hand:,} bytes of routed experts in the checkpoint" in text
    assert f"{packed:,} of them packed quantized factors" in text and "floats only" in text


def test_other_directories_have_no_checkpoint_footprint(tiny_checkpoint, tiny_model, tmp_path):
    source = tiny_checkpoint(ARCH)
    assert checkpoint_footprint(source) is None and checkpoint_footprint(tmp_path) is None
    assert "checkpoint" not in routed_footprint(tiny_model(ARCH))
    plain = save_compressed(source, quick_fit(source), tmp_path / "plain")       # unquantized: nothing packed
    ckpt = checkpoint_footprint(plain)
    assert ckpt["packed_bytes"] == 0 and 0 < ckpt["routed_bytes_after"] < ckpt["routed_bytes_before"]
