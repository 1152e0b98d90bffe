"""Round three, class 7: valid but unusual checkpoints compress. A dead (all-zero) expert reconstructs exactly to
zero and the model card lists it; a duplicated expert compresses (it is listed when its factors coincide)."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

import globe
from globe.cli.main import main
from tests.reliability.battery import QUICK


def test_dead_and_duplicated_experts_compress(tmp_path, tiny_checkpoint):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model)
    tensors = load_file(str(model / "model.safetensors"))
    for key in list(tensors):
        if "layers.0.mlp.experts.1." in key:
            tensors[key] = torch.zeros_like(tensors[key])                       # dead
        if "layers.0.mlp.experts.3." in key:
            tensors[key] = tensors[key.replace(".experts.3.", ".experts.2.")].clone()   # copy of expert 2
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["--log-level", "ERROR", "compress", str(model), "-o", str(tmp_path / "c"), *QUICK]) == 0
    experts = globe.load_compressed(tmp_path / "c", mode="dense").model.layers[0].mlp.experts
    for family in experts.factored:
        weights = experts.reconstruct(family)
        assert torch.equal(weights[1], torch.zeros_like(weights[1]))
        assert torch.isfinite(weights).all()        # the duplicate fits (exact sharing of its codes: not yet)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "## Unusual experts" in card and "dead: L0E1" in card
