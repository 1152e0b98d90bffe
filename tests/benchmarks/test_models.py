"""benchmarks/models/: the evaluation models are what their scripts say (inventory, bf16 per-expert layout),
learned something (held-out perplexity well below the unigram baseline, every expert used), come with disjoint
held-out and calibration texts, and the upcycled one shares more across its experts than the from-scratch one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from globe.io import open_checkpoint

MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "models"
# name: (model_type, layers, experts, top-k, p, d, shared expert width (0: none))
SHAPES = {"upcycled-qwen2moe": ("qwen2_moe", 4, 32, 4, 64, 192, 256),
          "scratch-qwen2moe-e48": ("qwen2_moe", 4, 48, 6, 48, 160, 192),
          "mixtral-e8-top2": ("mixtral", 6, 8, 2, 256, 160, 0)}
MIN_STEPS = {"upcycled-qwen2moe": 1000}          # 4x the first, 4-CPU-minute version


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_inventory_and_training_record(name: str):
    model_type, layers, experts, top_k, p, d, shared = SHAPES[name]
    with open_checkpoint(MODELS / name) as reader:
        inv = reader.inventory()
    assert (inv.model_type, inv.num_layers, inv.num_experts, inv.top_k, inv.p, inv.d) == \
        (model_type, layers, experts, top_k, p, d)
    assert inv.moe_layers == list(range(layers)) and inv.dtype == "bfloat16" and inv.layout == "per_expert"
    assert inv.params["gate"] == inv.params["up"] == layers * experts * p * d
    assert inv.untouched.get("shared_experts", 0) == layers * 3 * shared * d
    record = json.loads((MODELS / name / "training.json").read_text())
    assert record["steps"] >= MIN_STEPS.get(name, 0)
    assert (MODELS / name / "model.safetensors").stat().st_size <= 15_000_000      # the size cap of the models
    heldout = record["heldout_eval_of_saved_bf16_model"]
    assert heldout["perplexity"] < heldout["unigram_perplexity"] / 3
    assert heldout["expert_utilisation"]["unused_experts"] == 0


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_heldout_and_calibration_texts_are_disjoint(name: str):
    held, calib = ((MODELS / name / f).read_text(encoding="utf-8") for f in ("heldout.txt", "calib.txt"))
    held_docs, calib_docs = ({doc.strip() for doc in text.split("<|endoftext|>")} for text in (held, calib))
    assert len(held) > 100_000 and len(calib) > 100_000 and not held_docs & calib_docs


def test_upcycled_experts_share_more_than_scratch_experts():
    sharing = {n: json.loads((MODELS / n / "training.json").read_text())["expert_sharing"]["up"]["mean_over_layers"]
               for n in ("upcycled-qwen2moe", "scratch-qwen2moe-e48")}
    up, scratch = sharing["upcycled-qwen2moe"], sharing["scratch-qwen2moe-e48"]
    assert up["mean_nearest_abs_cos"] > 2 * scratch["mean_nearest_abs_cos"]       # siblings of one dense shard
    assert up["mean_abs_cos"] > 1.5 * scratch["mean_abs_cos"]
    assert up["mean_expert_energy"] > 2 / 32 and scratch["mean_expert_energy"] < 1.5 / 48   # vs 1/E if independent
