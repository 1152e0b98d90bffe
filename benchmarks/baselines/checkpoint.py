"""Routed-expert weights in and out of a transformers model, and dense checkpoints written with them.

Uses transformers' fused experts layout (`gate_up_proj` [E, 2p, d], gate rows first; `down_proj` [E, d, p]).
`write_dense` puts a baseline's reconstructed gate/up weights into the original model (in its dtype) and saves it
with `save_pretrained`, so the result loads with stock `AutoModelForCausalLM.from_pretrained` like GloBE's own
dense export (`globe.export_dense`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchmarks.baselines.fisher import fused_experts

FAMILIES = ("gate", "up")


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval()


def read_families(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"gate", "up": [L, E, p, d], "down": [L, E, d, p]} float32 copies of the model's routed experts."""
    experts = fused_experts(model)
    fused = torch.stack([m.gate_up_proj.detach().float() for m in experts.values()])   # [L, E, 2p, d]
    p = fused.shape[2] // 2
    down = torch.stack([m.down_proj.detach().float() for m in experts.values()])
    return {"gate": fused[:, :, :p].clone(), "up": fused[:, :, p:].clone(), "down": down}


@torch.no_grad()
def set_families(model: nn.Module, families: dict[str, torch.Tensor]) -> None:
    """Overwrite the model's gate/up experts with [L, E, p, d] tensors, and its down projections with a "down"
    [L, E, d, p] tensor where given (cast to the experts' dtype)."""
    experts = fused_experts(model)
    for i, module in enumerate(experts.values()):
        w = module.gate_up_proj
        p = w.shape[1] // 2
        for j, family in enumerate(FAMILIES):
            if family in families:
                w[:, j * p:(j + 1) * p].copy_(families[family][i].to(w.dtype))
        if "down" in families:
            module.down_proj.copy_(families["down"][i].to(module.down_proj.dtype))


def write_dense(model_dir: str | Path, families: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Dense HF checkpoint of model_dir with its gate/up (and "down", if given) experts replaced; returns out_dir."""
    model = load_causal_lm(model_dir)
    set_families(model, families)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
