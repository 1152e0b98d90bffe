"""Bytes a model holds, and the size of the `cached` runtime's cache from a memory budget.

    model_bytes(model)                   # unique parameters + buffers (persistent or not), each storage once
    dense_model_bytes(patched)           # what the unpatched model would hold (GloBE factors -> dense experts)
    cache_capacity(module, budget)       # experts one GlobeExperts layer can cache within `budget` bytes

The default cache budget is DEFAULT_CACHE_FRACTION of the original model's bytes, split evenly over the MoE layers:
the patched model then holds at most its stored bytes plus that fraction of the original (a cache sized by a count
of experts, as before, cost up to 25 % of a small model and ate most of the savings).
"""
from __future__ import annotations

import torch
from torch import nn

from globe.runtime.experts import GlobeExperts

DEFAULT_CACHE_FRACTION = 0.04      # of the original model's bytes, for all layers' caches together


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in _unique(tensors))


def model_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes of the model's unique parameters (+ all buffers, persistent or not, when `buffers`)."""
    tensors = list(model.parameters())
    if buffers:
        tensors += list(model.buffers())
    return tensor_bytes(tensors)


def dense_model_bytes(model: nn.Module) -> int:
    """Bytes the model would hold unpatched: GloBE factors and runtime buffers replaced by the dense experts."""
    modules = [m for m in model.modules() if isinstance(m, GlobeExperts)]
    owned = {id(t) for m in modules for t in list(m.parameters()) + list(m.buffers())}
    dense_params = [t for m in modules for f in ("gate", "up", "down") if f not in m.factored
                    for t in [m.dense_weight(f)]]
    kept = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in owned]
    dense = sum(len(m.factored) * m.num_experts * m.hidden_dim * m.intermediate_dim * m.source_dtype.itemsize
                for m in modules)
    return tensor_bytes(kept + dense_params) + dense


def default_cache_bytes(original_bytes: int) -> int:
    return int(DEFAULT_CACHE_FRACTION * original_bytes)


def slot_bytes(module: nn.Module) -> int:
    """Bytes one cached expert takes in a GlobeExperts layer: its mixed atoms [r, in] of every factored family."""
    return sum(module.layer_bank(f)[0].numel() * module.bank[f].element_size() for f in module.factored)


def cache_capacity(module: nn.Module, budget: int) -> int:
    """Experts of `module` whose mixed atoms fit in `budget` bytes (at most all of its experts)."""
    per_expert = slot_bytes(module)
    return min(module.num_experts, int(budget) // per_expert) if per_expert else 0
