"""Parameter and byte counts of a model's routed experts, before (dense) and after GloBE.

Stored tensors are counted once each however many layers reference them (the shared banks), by storage. Floating
tensors count as parameters; integer code indices count in bytes only. Runtime working memory (cache slots,
`dense`-mode reconstructions: non-persistent buffers) is reported separately, and for the whole model: the bytes it
holds now (parameters + all buffers + cache, `model_bytes`) against those of the unpatched model (`original_bytes`).
A model loaded from a compressed checkpoint also gets `checkpoint`: the routed experts' stored bytes read from that
checkpoint (checkpoint_footprint), packed integer codes included, which the parameter counts leave out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from globe.export.card import tensor_bytes
from globe.formats.checkpoint import PACKED_BUFFERS, is_compressed, is_globe_state, read_quant, stored_prefix
from globe.io.arch import get_arch
from globe.io.model import experts_modules, model_arch
from globe.runtime.experts import GlobeExperts
from globe.runtime.memory import dense_model_bytes, model_bytes


def _tensors(modules: list[nn.Module], persistent: bool) -> list:
    """Unique tensors of the modules: parameters + persistent buffers, or only non-persistent buffers."""
    seen, out = set(), []
    for module in modules:
        named = []
        for sub in module.modules():
            skip = getattr(sub, "_non_persistent_buffers_set", set())
            if persistent:
                named += list(sub._parameters.values())
                named += [b for n, b in sub._buffers.items() if n not in skip]
            else:
                named += [b for n, b in sub._buffers.items() if n in skip]
        for tensor in named:
            if tensor is None:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                out.append(tensor)
    return out


def _count(tensors: list) -> tuple[int, int]:
    params = sum(t.numel() for t in tensors if t.is_floating_point())
    return params, sum(t.numel() * t.element_size() for t in tensors)


def routed_footprint(model: nn.Module) -> dict[str, int | float]:
    """Routed-expert params/bytes: dense (before), stored now (after), runtime extras, and model totals."""
    modules = list(experts_modules(model).values())
    layout = model_arch(model)[0].layout
    stored, stored_bytes = _count(_tensors(modules, persistent=True))
    _, runtime_bytes = _count(_tensors(modules, persistent=False))
    dense, dense_bytes = 0, 0
    for module in modules:
        if isinstance(module, GlobeExperts):
            n = 3 * module.num_experts * module.hidden_dim * module.intermediate_dim
            dense, dense_bytes = dense + n, dense_bytes + n * module.source_dtype.itemsize
        else:
            tensors = layout.tensors(module)
            dense += sum(t.numel() for t in tensors)
            dense_bytes += sum(t.numel() * t.element_size() for t in tensors)
    total, total_bytes = _count(_tensors([model], persistent=True))
    held = model_bytes(model)
    original = dense_model_bytes(model) if any(isinstance(m, GlobeExperts) for m in modules) else held
    stored_before = total_bytes - stored_bytes + dense_bytes
    whole = {"original_bytes": original, "model_bytes": held, "runtime_ratio": held / original,
             "stored_bytes_ratio": total_bytes / stored_before if stored_before else 1.0}
    checkpoint = checkpoint_footprint(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return {**whole, **({"checkpoint": checkpoint} if checkpoint else {}),
            "routed_params_before": dense, "routed_params_after": stored,
            "routed_bytes_before": dense_bytes, "routed_bytes_after": stored_bytes,
            "routed_ratio": stored / dense if dense else 1.0, "runtime_bytes": runtime_bytes,
            "total_params_before": total - stored + dense, "total_params_after": total,
            "total_bytes_after": total_bytes, "total_ratio": total / (total - stored + dense)}


def checkpoint_footprint(path: str | Path) -> dict | None:
    """The routed experts' stored bytes in a compressed checkpoint (format 2 or 3), from its files: after, every
    tensor under a routed-experts module in the safetensors headers (GloBE state, packed codes / scales / zeros of
    quantized parts, projections kept dense); before, the source's routed params (its inventory, recorded in
    globe_config.json) at the source's dtype. None for any other directory (or one that records no source)."""
    path = Path(path)
    if not str(path) or not path.is_dir() or not is_compressed(path) or not read_quant(path):
        return None
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    sizes, spec = tensor_bytes(path), get_arch(config)
    family = next(iter(config["quantization_config"]["families"]))
    prefixes = tuple(f"{stored_prefix(spec, layer, sizes, family)}." for layer in spec.moe_layers(config))
    routed = [(k.partition(prefix)[2], v) for k, v in sizes.items() for prefix in prefixes if k.startswith(prefix)]
    try:
        source = json.loads((path / "globe_config.json").read_text(encoding="utf-8"))["source"]["inventory"]
        before = int(source["routed_params"]) * getattr(torch, source["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        before = None
    after = sum(v for _, v in routed)
    packed = sum(v for k, v in routed if is_globe_state(k) and k.rpartition(".")[2] in PACKED_BUFFERS)
    return {"path": str(path), "routed_bytes_before": before, "routed_bytes_after": after, "packed_bytes": packed,
            "routed_ratio": after / before if before else None}
