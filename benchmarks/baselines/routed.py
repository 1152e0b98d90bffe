"""The routed experts' output on calibration tokens: capture each MoE layer's inputs, compare reconstructions.

The error of a reconstruction is ||y - y_hat|| / ||y|| over all layers and tokens, with
y_t = sum_{e in top-k(t)} w_te D_e (act(G_e x_t) * U_e x_t) the layer's routed-experts output (routing weights
w_te as the router gives them), x_t the layer's input in the ORIGINAL model (teacher forcing: the error of the
experts alone, not accumulated through layers), D_e the original down projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.baselines.fisher import fused_experts


@dataclass
class Routed:
    """One MoE layer's captured tokens: hidden [T, d], index [T, k] (experts), weight [T, k] (routing)."""

    hidden: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


@torch.no_grad()
def capture_routed(model: nn.Module, input_ids: torch.Tensor, window: int = 256) -> tuple[list[Routed], object]:
    """Run input_ids ([n]) through the model in windows; ([Routed per MoE layer], the experts' act_fn)."""
    experts = fused_experts(model)
    store: dict[int, list[tuple[torch.Tensor, ...]]] = {layer: [] for layer in experts}

    def hook(layer: int):
        def pre(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            store[layer].append(tuple(v.detach().float() if v.is_floating_point() else v.detach() for v in values[:3]))
        return pre

    handles = [m.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer, m in experts.items()]
    try:
        for start in range(0, input_ids.numel(), window):
            model(input_ids=input_ids[start:start + window].view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = [Routed(*(torch.cat([c[i].reshape(-1, c[i].shape[-1]) for c in store[layer]]) for i in range(3)))
           for layer in experts]
    return out, next(iter(experts.values())).act_fn


def routed_output(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, tokens: Routed) -> torch.Tensor:
    """[T, d] routed-experts output of one layer (gate/up [E, p, d], down [E, d, p])."""
    x = tokens.hidden
    y = torch.zeros_like(x)
    for e in tokens.index.unique().tolist():
        rows, slot = (tokens.index == e).nonzero(as_tuple=True)
        xe = x[rows]                                                           # [n_e, d]
        h = act(xe @ gate[e].T) * (xe @ up[e].T)                               # [n_e, p]
        y.index_add_(0, rows, (h @ down[e].T) * tokens.weight[rows, slot, None])
    return y


def output_error(original: dict[str, torch.Tensor], recon: dict[str, torch.Tensor], act,
                 captured: list[Routed]) -> dict:
    """{"rel_err": overall, "per_layer": [...]} of the routed output with recon's gate/up (and recon's down where
    it has one, else the original's), under the original routing."""
    num = den = 0.0
    per_layer = []
    for layer, tokens in enumerate(captured):
        y = routed_output(original["gate"][layer], original["up"][layer], original["down"][layer], act, tokens)
        y_hat = routed_output(recon["gate"][layer], recon["up"][layer], recon.get("down", original["down"])[layer], act,
                              tokens)
        n, dn = float((y - y_hat).double().square().sum()), float(y.double().square().sum())
        num, den = num + n, den + dn
        per_layer.append(math.sqrt(n / dn))
    return {"rel_err": math.sqrt(num / den), "per_layer": per_layer}
