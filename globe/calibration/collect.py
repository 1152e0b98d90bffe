"""Collect ActivationStats from calibration text with forward pre-hooks on the routed-experts modules.

    stats = collect_stats(model, input_ids, window=256)      # model: an original (unpatched) transformers model

Each MoE layer's experts module is called as forward(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]);
the hook reads those inputs only (the forward itself is untouched) and accumulates, in fp64, x x^T over all
tokens and, per expert, over the tokens routed to it, plus h h^T of the down projection's input
h = act(W_g x) * (W_u x) recomputed from the module's own weights, and per intermediate channel j the output
sensitivities ||D_:,j||^2 sum_t (act'(g_j) u_j)^2 (gate) and ||D_:,j||^2 sum_t act(g_j)^2 (up). Hooks are removed even if a forward fails.
With routed=cap > 0 it also keeps the first `cap` tokens routed to each expert and their routing weights
(globe.calibration.routed; stats.routed), for the whole-expert refinement.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from globe.calibration.routed import RoutedCollector, cap_for
from globe.calibration.stats import ActivationStats
from globe.errors import ArtifactError, ConfigError
from globe.io.layout import ExpertsLayout
from globe.io.model import experts_modules, model_arch
from globe.progress import progress

log = logging.getLogger(__name__)


class _LayerSums:
    """Running fp64 sums of one MoE layer."""

    def __init__(self, num_experts: int, d: int, p: int, per_expert: bool) -> None:
        self.hidden = torch.zeros(d, d, dtype=torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.weight_sums = torch.zeros(num_experts, dtype=torch.float64)
        self.hidden_expert = torch.zeros(num_experts, d, d, dtype=torch.float64) if per_expert else None
        self.inter_expert = torch.zeros(num_experts, p, p, dtype=torch.float64) if per_expert else None
        self.gate_channels = torch.zeros(num_experts, p, dtype=torch.float64) if per_expert else None
        self.up_channels = torch.zeros(num_experts, p, dtype=torch.float64) if per_expert else None
        self.tokens = 0
        self.routed: tuple[RoutedCollector, int] | None = None      # (collector, this layer)

    def add(self, module: nn.Module, layout: ExpertsLayout, hidden: torch.Tensor, index: torch.Tensor,
            weights: torch.Tensor) -> None:
        x = hidden.detach().reshape(-1, hidden.shape[-1]).double().cpu()           # [T, d]
        self.hidden += x.T @ x
        self.tokens += x.shape[0]
        k = index.shape[-1]
        flat = index.reshape(-1).cpu()                                              # [T k] expert per pair
        token = torch.arange(x.shape[0]).repeat_interleave(k)                      # [T k] token per pair
        valid = flat < self.counts.numel()                                          # drop expert-parallel sentinels
        flat, token, pair_w = flat[valid], token[valid], weights.reshape(-1).cpu().double()[valid]
        self.counts += torch.bincount(flat, minlength=self.counts.numel())
        self.weight_sums.index_add_(0, flat, pair_w)
        if self.hidden_expert is None:
            return
        p = self.inter_expert.shape[-1]
        w_gate, w_up, w_down = (layout.weight(module, f) for f in ("gate", "up", "down"))   # [E, out, in] each
        for e in flat.unique().tolist():
            xe = x[token[flat == e]]                                                # [n_e, d]
            if self.routed is not None:
                self.routed[0].add(self.routed[1], e, xe, pair_w[flat == e])
            self.hidden_expert[e] += xe.T @ xe
            gate_up = torch.cat([w_gate[e], w_up[e]]).detach().float().cpu()        # [2p, d]
            pre = xe.float() @ gate_up.T                                            # [n_e, 2p]
            gate, up = pre[:, :p], pre[:, p:]
            act, slope = _act_and_slope(layout.activation(module), gate)            # [n_e, p] each
            h = (act * up).double()                                                 # [n_e, p]
            self.inter_expert[e] += h.T @ h
            out_sq = w_down[e].detach().float().cpu().square().sum(0).double()      # [p] ||D_:,j||^2
            self.gate_channels[e] += (slope * up).double().square().sum(0) * out_sq
            self.up_channels[e] += act.double().square().sum(0) * out_sq


def _act_and_slope(act_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) and act'(x) elementwise (autograd on a detached copy)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = act_fn(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), slope


def _inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    if len(values) < 3:
        raise ArtifactError("routed-experts module called without (hidden_states, top_k_index, top_k_weights); "
                            "unsupported transformers version?")
    return values[0], values[1], values[2]


@torch.no_grad()
def collect_stats(model: nn.Module, input_ids: torch.Tensor, window: int = 256, per_expert: bool = True,
                  info: dict | None = None, batch_tokens: int = 4096, routed: int = 0,
                  routed_mb: int = 512) -> ActivationStats:
    """Run input_ids ([n] or [b, n]: b independent sequences) through `model` in windows of `window` tokens, as
    many rows per forward as fit in batch_tokens; the layers' ActivationStats (with routed > 0 and per_expert:
    stats.routed, up to `routed` routed tokens per expert, within routed_mb MiB)."""
    modules = experts_modules(model)
    layout = model_arch(model)[0].layout
    if not modules:
        raise ConfigError("the model has no MoE layer: nothing to calibrate")
    for layer, module in modules.items():
        if not layout.is_original(module):
            raise ArtifactError(f"layer {layer}'s experts ({type(module).__name__}) are not the original fused module; "
                                f"calibrate the original model, not a GloBE-patched one")
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.shape[1] < 2:
        raise ConfigError(f"calibration needs at least 2 tokens, got {ids.shape[1]}")
    num_experts, p, d = layout.dims(next(iter(modules.values())))
    sums = {layer: _LayerSums(num_experts, d, p, per_expert) for layer in modules}
    collector = None
    if routed > 0 and per_expert:
        cap = cap_for(routed, len(modules), num_experts, d, routed_mb)
        collector = RoutedCollector(list(modules), num_experts, d, cap, getattr(model.config, "hidden_act", "silu"))
        for layer in modules:
            sums[layer].routed = (collector, layer)

    def hook(layer: int):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sums[layer].add(module, layout, *_inputs(args, kwargs))
        return pre

    handles = [m.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        rows = max(1, batch_tokens // window)                                       # rows of ids per pass
        passes = [(r, s) for r in range(0, ids.shape[0], rows) for s in range(0, ids.shape[1], window)]
        for row, start in progress(passes, "calibrate"):
            model(input_ids=ids[row:row + rows, start:start + window].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = list(modules)

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(sums[layer], name) for layer in layers])

    return ActivationStats(layers=layers, hidden=stack("hidden"), tokens=sums[layers[0]].tokens,
                           counts=stack("counts"), weight_sums=stack("weight_sums"),
                           hidden_expert=stack("hidden_expert") if per_expert else None,
                           intermediate_expert=stack("inter_expert") if per_expert else None,
                           gate_channels=stack("gate_channels") if per_expert else None,
                           up_channels=stack("up_channels") if per_expert else None,
                           info={"window": window, **(info or {})},
                           routed=collector.samples() if collector is not None else None)
