"""The embedded default model: its inventory, and that a short GloBE fit of it beats per-expert SVD."""
from __future__ import annotations

import json

import torch

from globe.assets import DEFAULT_MODEL_DIR
from benchmarks.baselines import rel_err
from benchmarks.baselines.common import by_layer
from benchmarks.baselines.svd import per_expert_svd
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.io import open_checkpoint


def test_inventory_of_the_embedded_model():
    with open_checkpoint(DEFAULT_MODEL_DIR) as reader:
        inv = reader.inventory()
    assert (inv.model_type, inv.num_layers, inv.num_experts, inv.top_k, inv.p, inv.d) == ("qwen2_moe", 6, 16, 4, 128, 256)
    assert inv.moe_layers == list(range(6)) and inv.dtype == "bfloat16" and inv.layout == "per_expert"
    assert inv.params["gate"] == inv.params["up"] == 6 * 16 * 128 * 256
    assert inv.untouched["shared_experts"] == 6 * 3 * 512 * 256
    training = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    heldout = training["heldout_eval_of_saved_bf16_model"]
    assert heldout["perplexity"] < heldout["unigram_perplexity"] / 10      # it really learned


def test_short_fit_of_two_layers_beats_per_expert_svd_at_half_budget():
    with open_checkpoint(DEFAULT_MODEL_DIR) as reader:
        stack = reader.read_family("gate", layers=[0, 1])
    assert stack.weights.dtype == torch.bfloat16
    cfg = FitConfig(bank=BankConfig(budget=0.5), sparsity=SparsityConfig(target_support=8),
                    train=TrainConfig(am_iters=8, varpro_steps=30))
    fam = fit_family(stack.weights, stack.ids, cfg)
    stacked = by_layer(stack.weights, stack.ids)
    svd = rel_err(stacked, per_expert_svd(stacked, 0.5).weights)
    assert fam.metrics["params"]["stored"] <= 0.5 * fam.metrics["params"]["dense"] + 1
    assert fam.metrics["rel_err"] < svd, (fam.metrics["rel_err"], svd)
