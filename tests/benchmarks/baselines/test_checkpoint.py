"""Dense checkpoints of baseline reconstructions load in stock transformers with exactly those weights."""
from __future__ import annotations

import torch

from benchmarks.baselines.checkpoint import load_causal_lm, read_families, write_dense
from globe.assets import DEFAULT_MODEL_DIR


def test_write_dense_round_trips_the_reconstructed_experts(tmp_path):
    original = read_families(load_causal_lm(DEFAULT_MODEL_DIR))
    assert original["gate"].shape == (6, 16, 128, 256) and original["down"].shape == (6, 16, 256, 128)
    recon = {f: original[f].clone() for f in ("gate", "up")}
    recon["gate"][0, 3] = 0.0
    recon["up"][5, 15] *= -2.0
    write_dense(DEFAULT_MODEL_DIR, recon, tmp_path)
    import transformers
    back = read_families(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))
    for f in ("gate", "up"):
        assert torch.equal(back[f], recon[f].to(torch.bfloat16).float())
    assert torch.equal(back["down"], original["down"])
    assert not torch.equal(back["gate"], original["gate"])
