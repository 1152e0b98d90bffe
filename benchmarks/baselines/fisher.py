"""Fisher information of the routed experts' gate/up weights, as D2-MoE's `preprocess/get_fisher.py` computes it.

For each calibration batch (a window of tokens): the next-token cross-entropy of the model, backward, and the
elementwise square of each expert weight's gradient accumulated; the sum is divided by the number of batches
(get_fisher.py's non-diagonal `calib_fisher_info`). Our differences: windows of the calibration text instead of
random 2048-token wikitext samples, the model in float32, and the experts in transformers' fused layout
(`gate_up_proj` [E, 2p, d]: gate rows first, then up), so the gradient of every expert comes from one tensor.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from globe.progress import progress

log = logging.getLogger(__name__)
_LAYER = re.compile(r"layers\.(\d+)\.")


def fused_experts(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: routed-experts module} for every module holding a 3-D `gate_up_proj` (transformers' fused
    MoE experts); raises ValueError if the model has none."""
    found = {}
    for name, module in model.named_modules():
        w = getattr(module, "gate_up_proj", None)
        if isinstance(w, torch.Tensor) and w.dim() == 3 and isinstance(getattr(module, "down_proj", None),
                                                                        torch.Tensor):
            match = _LAYER.search(name + ".")
            if match:
                found[int(match.group(1))] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no fused routed-experts module (gate_up_proj [E, 2p, d])")
    return dict(sorted(found.items()))


def expert_fisher(model: nn.Module, input_ids: torch.Tensor, window: int = 256, batches: int = 64
                  ) -> dict[str, torch.Tensor]:
    """{"gate": [L, E, p, d], "up": [L, E, p, d]} mean squared gradients over `batches` windows of input_ids ([n])."""
    experts = fused_experts(model)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    for module in experts.values():
        module.gate_up_proj.requires_grad_(True)
    sums = {layer: torch.zeros_like(m.gate_up_proj, dtype=torch.float64) for layer, m in experts.items()}
    starts = list(range(0, input_ids.numel() - window, window))[:batches]     # each window + 1 target
    was_training = model.training
    model.train()
    try:
        for start in progress(starts, "fisher"):
            ids = input_ids[start:start + window + 1].view(1, -1)
            out = model(input_ids=ids[:, :-1], use_cache=False)
            loss = nn.functional.cross_entropy(out.logits[0].float(), ids[0, 1:])
            model.zero_grad(set_to_none=True)
            loss.backward()
            for layer, module in experts.items():
                sums[layer] += module.gate_up_proj.grad.double().square()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    fisher = torch.stack([sums[layer] / max(1, len(starts)) for layer in experts]).float()   # [L, E, 2p, d]
    p = fisher.shape[2] // 2
    return {"gate": fisher[:, :, :p].contiguous(), "up": fisher[:, :, p:].contiguous()}
