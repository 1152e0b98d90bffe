"""The one constructor of GlobeExperts from an original routed-experts module, for apply_globe (factors from an
artifact) and for the compressed checkpoint's loader (uninitialised tensors of the stored shapes) alike.

    experts = build_experts(module, layer, spec.layout, banks, phis, codes, adapters, max_gathered_pairs)

A bank or adapters may be a PackedTensor (quantized: integer codes + scales + zeros, dequantized on use); a packed
bank is registered only in the MoE layer that stores it (the first; `shared_banks` names it in the others).

The module is read through its architecture's ExpertsLayout (globe.io.layout): its sizes, its activation, its
dtype, and the dense weights of the projections that are not factored.
"""
from __future__ import annotations

import torch
from torch import nn

from globe.io.layout import FAMILIES, ExpertsLayout
from globe.runtime.experts import GlobeExperts
from globe.runtime.packed import PackedTensor


def dense_parts(module: nn.Module, layout: ExpertsLayout, factored: set[str]) -> dict[str, nn.Parameter]:
    """The untouched projections of an original experts module: {family: [E, out, in]} for every family not in
    `factored` (copies, except a weight the layout stores as a tensor of its own, which keeps its object)."""
    own = {id(t) for t in layout.tensors(module)}
    dense: dict[str, nn.Parameter] = {}
    for family in FAMILIES:
        if family in factored:
            continue
        weight = layout.weight(module, family)
        dense[family] = weight if id(weight) in own and isinstance(weight, nn.Parameter) else \
            nn.Parameter(weight.data.clone(), requires_grad=weight.requires_grad)
    return dense


def build_experts(module: nn.Module, layer: int, layout: ExpertsLayout,
                  banks: dict[str, nn.Parameter | PackedTensor], phis: dict[str, str],
                  codes: dict[str, tuple[torch.Tensor, torch.Tensor]], adapters: dict[str, torch.Tensor | PackedTensor],
                  max_gathered_pairs: int, shared_banks: frozenset[str] = frozenset(),
                  residuals: dict[str, PackedTensor] | None = None) -> GlobeExperts:
    """GlobeExperts replacing the original `module` of MoE layer `layer`: the factored families' shared banks
    {family: [m, r, in]}, this layer's codes {family: (indices [E, k], values [E, k])} and adapters
    {family: [E, out, r]} and packed residuals {family: [E, out, in]} where stored; the other projections stay
    dense."""
    num_experts, p, d = layout.dims(module)
    return GlobeExperts(layer, num_experts, d, p, layout.activation(module), banks, phis, codes, adapters,
                        dense_parts(module, layout, set(banks)), max_gathered_pairs, layout.dtype(module),
                        shared_banks, residuals)
