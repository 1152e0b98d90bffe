"""Routing statistics for cache warm-up: how often each routed expert of each MoE layer is chosen on some text.

    counts = collect_routing_counts(model, input_ids)       # {layer: LongTensor [E]}
    warm_up(model, counts)

Forward hooks on the routers (ArchSpec.router_path) read the top-k indices they return; works on original and
patched models alike, and removes its hooks even when the forward fails.
"""
from __future__ import annotations

import torch
from torch import nn

from globe.io.layout import ExpertsLayout
from globe.io.model import experts_modules, model_arch


def _num_experts(module: nn.Module, layout: ExpertsLayout) -> int:
    return int(getattr(module, "num_experts", 0) or layout.dims(module)[0])


@torch.no_grad()
def collect_routing_counts(model: nn.Module, input_ids: torch.Tensor, window: int = 256) -> dict[int, torch.Tensor]:
    """Route `input_ids` ([n] or [b, n]) through the model in windows of `window` tokens; {layer: counts [E]}."""
    spec, _ = model_arch(model)
    sizes = {layer: _num_experts(m, spec.layout) for layer, m in experts_modules(model).items()}
    counts = {layer: torch.zeros(e, dtype=torch.long) for layer, e in sizes.items()}

    def hook(layer: int):
        def record(module: nn.Module, args: tuple, output: tuple) -> None:
            indices = output[-1].reshape(-1).cpu()                                  # top-k expert ids
            counts[layer] += torch.bincount(indices[indices < sizes[layer]], minlength=sizes[layer])
        return record

    handles = [model.get_submodule(spec.router_path(layer)).register_forward_hook(hook(layer)) for layer in sizes]
    try:
        ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        device = next(model.parameters()).device
        for start in range(0, ids.shape[1], window):
            model(input_ids=ids[:, start:start + window].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return counts
