"""Bytes a model holds, and the size of the `cached` runtime's cache from a memory budget.

    model_bytes(model)                   # unique parameters + buffers (persistent or not), each storage once
    dense_model_bytes(patched)           # what the unpatched model would hold (GloBE factors -> dense experts)
    held_breakdown(model)                # {"weights", "caches"}: stored tensors vs what the runtime rebuilds
    held_packed_bytes(model)             # of the weights, the packed (quantized) factors (caches: dequantized)
    cache_capacity(module, budget)       # experts one GlobeExperts layer can cache within `budget` bytes

The default cache budget is DEFAULT_CACHE_FRACTION of the original model's bytes, split evenly over the MoE layers:
the patched model then holds at most its stored bytes plus that fraction of the original (a cache sized by a count
of experts, as before, cost up to 25 % of a small model and ate most of the savings).
"""
from __future__ import annotations

import torch
from torch import nn

from globe.runtime.experts import GlobeExperts
from globe.runtime.packed import PackedTensor

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
    """Bytes one cached expert takes in a GlobeExperts layer: its mixed atoms [r, in] of every factored family (and
    its dequantized adapters [out, r] where they are stored packed), in the factor dtype."""
    if not module.factored:
        return 0
    itemsize = module.factor_dtype(module.factored[0]).itemsize
    return sum(a * b for a, b in module.cache_shapes().values()) * itemsize


def cache_capacity(module: nn.Module, budget: int) -> int:
    """Experts of `module` whose mixed atoms fit in `budget` bytes (at most all of its experts)."""
    per_expert = slot_bytes(module)
    return min(module.num_experts, int(budget) // per_expert) if per_expert else 0


def cache_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors the runtime derives from the stored factors: the cached mode's LRU slots (and its dequantized copy of
    a packed bank) and the dense mode's reconstructed weights (`dense_<family>` buffers) of every GlobeExperts
    layer."""
    out = []
    for module in model.modules():
        if isinstance(module, GlobeExperts):
            out += [getattr(module, f"dense_{f}") for f in module.factored if hasattr(module, f"dense_{f}")]
            if module.cache is not None:
                out += [module.cache.slots(f) for f in module.cache.families]
        if isinstance(module, PackedTensor) and module.kept() is not None:
            out.append(module.kept())                 # a packed bank kept dequantized by the cached mode
    return out


def held_packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed (quantized) banks and adapters of the model's GlobeExperts layers: integer codes, scales
    and zeros (part of held_breakdown's `weights`; what the caches hold of them is dequantized)."""
    return tensor_bytes([t for m in model.modules() if isinstance(m, PackedTensor) for t in m.buffers()])


def held_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds, split into `weights` (parameters and buffers that are stored or loaded, packed parts
    included) and `caches` (tensors the runtime rebuilds from them: LRU slots with mixed atoms and dequantized
    adapters, dense reconstructions); each storage counted once."""
    caches = _unique(cache_tensors(model))
    cached = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) for t in caches}
    weights = [t for t in _unique(list(model.parameters()) + list(model.buffers()))
               if (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) not in cached]
    return {"weights": tensor_bytes(weights), "caches": tensor_bytes(caches)}
