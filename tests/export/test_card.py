"""The model card's byte rows (globe.export.card, from the byte model globe.fit.planning.bytes) against a hand count:
the routed experts' bytes in the source checkpoint, and the bytes of every tensor the artifact of the same fit
stores for a family (safetensors headers), per family and in total."""
from __future__ import annotations

import re

import pytest
import torch

import globe
from globe.export.card import model_card, tensor_bytes
from globe.fit.config import BankConfig, FitConfig, QuantSection, SparsityConfig, TrainConfig


@pytest.mark.parametrize("bits", [4, None])
def test_card_states_bytes_before_and_after_per_family_and_in_total(tiny_checkpoint, tmp_path, bits):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    cfg = FitConfig(bank=BankConfig(m=4, r=8), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=2, varpro_steps=3), quant=QuantSection(bits=bits, group=8))
    result = globe.fit_model(path, cfg)
    art = globe.save(result, tmp_path / "art")
    card = model_card(result, art)
    source = tensor_bytes(path)
    stored_total = 0
    for fam in ("gate", "up"):
        dense = sum(n for k, n in source.items() if re.search(rf"experts\.\d+\.{fam}_proj\.weight$", k))
        stored = sum(n for k, n in tensor_bytes(art).items() if k.split(".")[0] == fam)
        stored_total += stored
        assert dense == result.params[f"dense_{fam}"] * 2 > 0                # bf16
        assert f"| bytes of {fam} (routed experts) | {dense:,} | {stored:,} | {stored / dense:.3f} (" in card
    before = sum(source.values())
    after = before - result.params["dense_gate"] * 2 - result.params["dense_up"] * 2 + stored_total
    assert f"| bytes of all tensors (byte model) | {before:,} | {after:,} |" in card
