"""apply_globe: swap every MoE layer's routed-experts module of a loaded transformers model for GlobeExperts.

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_globe(model, "out/", mode="cached", cache_size=8)    # in place, like peft / torchao; returns the model
    warm_up(model, collect_routing_counts(model, calibration_ids))

Where the experts live comes from the architecture registry applied to the model (globe.io.model). The artifact
is checked against the model first (globe.artifact.check_compatible): a mismatch is an ArtifactError.
One Parameter per family bank is created and handed to every layer (stored once, like VeRA's shared matrices).
A quantized fit (FamilyFit.quant) is applied packed: its bank is one PackedTensor (registered in the first MoE layer,
referenced by the others) and each layer's adapters are a PackedTensor of that layer's experts and rank, holding the
fit's own integer codes, scales and zeros (globe.runtime.packed); so are its residuals (quant["residual"]), per layer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from globe.artifact import check_compatible, load
from globe.core.mixing import SparseCodes, sparse_codes
from globe.core.result import FamilyFit, FitResult
from globe.errors import ArtifactError, ConfigError
from globe.formats.checkpoint import family_entry, quant_document, state_key
from globe.formats.load_guard import mark
from globe.io.layout import ExpertsLayout
from globe.io.model import experts_modules, model_arch, model_shape
from globe.runtime.build import build_experts
from globe.runtime.experts import MODES, GlobeExperts
from globe.runtime.memory import cache_capacity, default_cache_bytes, dense_model_bytes, model_bytes
from globe.runtime.packed import PackedTensor, select_rows

log = logging.getLogger(__name__)


def globe_modules(model: nn.Module) -> dict[int, GlobeExperts]:
    """layer -> GlobeExperts of a patched model (empty for an unpatched one)."""
    return {m.layer: m for m in model.modules() if isinstance(m, GlobeExperts)}


def layer_rows(fam: FamilyFit, layers: list[int], num_experts: int) -> dict[int, torch.Tensor]:
    """layer -> rows [E] of the family for experts 0..E-1 (after globe.artifact.check_compatible)."""
    index = {(int(l), int(e)): i for i, (l, e) in enumerate(fam.ids.tolist())}
    return {l: torch.tensor([index[(l, e)] for e in range(num_experts)]) for l in layers}


def validate(model: nn.Module, result: FitResult) -> dict[str, dict[int, torch.Tensor]]:
    """Check that `result` fits the unpatched `model` (globe.artifact.check_compatible); {family: {layer: rows [E]}}."""
    if globe_modules(model):
        raise ArtifactError("model is already patched by apply_globe; load a fresh model to apply an artifact")
    shape = model_shape(model)
    check_compatible(result, shape)
    return {name: layer_rows(fam, shape.moe_layers, shape.num_experts) for name, fam in result.families.items()}


def family_codes(result: FitResult) -> dict[str, SparseCodes]:
    """{family: SparseCodes [N, k]} of every row, one width k per family (so every layer's codes have the same
    shape, as a compressed checkpoint stores them; padding adds exact zeros). A family with no base (rank 0,
    globe.fit.engine.plain) gets k = 0: it stores no code."""
    return {name: sparse_codes(fam.codes.float(), min_width=0 if fam.bank.shape[1] == 0 else 1)
            for name, fam in result.families.items()}


def _build_layer(module: nn.Module, layer: int, layout: ExpertsLayout, result: FitResult,
                 rows: dict[str, dict[int, torch.Tensor]], banks: dict[str, nn.Parameter | PackedTensor],
                 dtype: torch.dtype, max_gathered_pairs: int, all_codes: dict[str, SparseCodes],
                 unpacked: dict[str, torch.Tensor], first: bool) -> GlobeExperts:
    device = layout.device(module)
    codes, adapters, residuals = {}, {}, {}
    for name, fam in result.families.items():
        r = rows[name][layer]
        idx, values = all_codes[name]
        codes[name] = (idx[r].to(device), values[r].to(device=device, dtype=dtype))
        rank = fam.layer_rank()[layer]                                   # this layer uses bank[:, :rank]
        if "adapters" in fam.quant:                                      # packed: the fit's own codes and scales
            part = select_rows(fam.quant["adapters"], r, rank, unpacked[name])
            adapters[name] = PackedTensor.from_quantized(part, _method(fam), device)
        else:
            adapters[name] = fam.adapters[r, :, :rank].to(device=device, dtype=dtype).contiguous()   # [E, out, r_l]
        if "residual" in fam.quant:                                      # packed residuals [E, out, in]
            residuals[name] = PackedTensor.from_quantized(select_rows(fam.quant["residual"], r), _residual_method(fam),
                                                          device)
    shared = frozenset() if first else frozenset(n for n, b in banks.items() if isinstance(b, PackedTensor))
    return build_experts(module, layer, layout, banks, {n: f.phi for n, f in result.families.items()}, codes,
                         adapters, max_gathered_pairs, shared, residuals)


def _method(fam: FamilyFit) -> str | None:
    """The quantizer a fit used (its metrics record the settings), for the checkpoint's record."""
    return (fam.metrics.get("quant") or {}).get("method")


def _residual_method(fam: FamilyFit) -> str | None:
    return ((fam.metrics.get("quant") or {}).get("residual") or {}).get("method")


def share_banks(model: nn.Module) -> None:
    """Declare every layer's bank but the first MoE layer's as a tied copy, so that transformers' save_pretrained
    writes the bank once (instead of refusing the shared tensors) and from_pretrained ties it back."""
    modules = globe_modules(model)
    for layer, module in modules.items():                     # a packed bank is registered in the first layer only
        module._tied_weights_keys = ({} if layer == min(modules) else
                                     {state_key("bank", f): state_key("bank", f) for f in module.factored
                                      if not module.is_packed("bank", f)})


def quantization_config(model: nn.Module, mode: str, cache_bytes: int | None = None) -> dict:
    """The `quantization_config` entry of config.json that describes a patched model (globe.formats.checkpoint)."""
    modules = globe_modules(model)
    first = modules[min(modules)]
    families = {f: family_entry(first.bank[f], first.code_indices[f], first.phis[f],
                                {layer: m.rank(f) for layer, m in modules.items()},
                                {**{part: getattr(first, part)[f].meta() for part in ("bank", "adapters")
                                    if first.is_packed(part, f)},
                                 **({"residual": first.residual[f].meta()} if f in first.residual else {})})
                for f in first.factored}
    return quant_document(families, mode, cache_bytes, first.max_gathered_pairs, first.factor_dtype(first.factored[0]),
                          first.source_dtype)


def apply_globe(model: nn.Module, artifact: FitResult | str | Path, mode: str = "cached",
                cache_size: int | None = None, dtype: torch.dtype | None = None, collect_stats: bool = False,
                max_gathered_pairs: int = 16, cache_bytes: int | None = None) -> nn.Module:
    """Replace the routed experts of every MoE layer of `model` (in place) by GlobeExperts; returns `model`.

    artifact: a FitResult or an artifact directory (globe.save). mode: factored | cached | dense.
    cache_size: experts per layer kept precomposed in `cached` mode; by default the cache is sized by
    cache_bytes, the bytes of all layers' caches together (default: DEFAULT_CACHE_FRACTION of the original model's
    bytes, so the patched model holds at most its stored bytes plus that fraction).
    dtype: storage dtype of banks/adapters/codes (default: the experts' dtype). collect_stats: count cache
    hits/misses. max_gathered_pairs: batches with at most this many (token, expert) pairs (decode) run as batched
    matmuls over per-pair gathered weights instead of grouped GEMMs.
    """
    if mode not in MODES:
        raise ConfigError(f"runtime mode must be one of {', '.join(MODES)}, not {mode!r}")
    result = artifact if isinstance(artifact, FitResult) else load(artifact)
    rows = validate(model, result)
    spec, _ = model_arch(model)
    modules = experts_modules(model)
    first, layout = next(iter(modules.values())), spec.layout
    dtype = dtype or layout.dtype(first)
    device = layout.device(first)
    banks = {n: PackedTensor.from_quantized(f.quant["bank"], _method(f), device) if "bank" in f.quant else
             nn.Parameter(f.bank.detach().to(device=device, dtype=dtype)) for n, f in result.families.items()}
    original_bytes = model_bytes(model)
    all_codes = family_codes(result)
    unpacked = {n: f.quant["adapters"].integer_codes() for n, f in result.families.items() if "adapters" in f.quant}
    for layer, module in modules.items():
        model.set_submodule(spec.experts_path(layer),
                            _build_layer(module, layer, layout, result, rows, banks, dtype, max_gathered_pairs,
                                         all_codes, unpacked, layer == min(modules)))
    share_banks(model)
    set_mode(model, mode, cache_size, cache_bytes, original_bytes)
    set_collect_stats(model, collect_stats)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = quantization_config(model, mode, cache_bytes)
        mark(model.config)                                  # stock transformers without globe refuses it in one line
    log.info("applied GloBE (%s mode) to %d MoE layers: families %s", mode, len(modules), ", ".join(result.families))
    return model


def set_mode(model: nn.Module, mode: str, cache_size: int | None = None, cache_bytes: int | None = None,
             original_bytes: int | None = None) -> None:
    """Switch every GlobeExperts of a patched model to another mode (dense weights rebuilt in fp32 from storage).

    In `cached` mode each layer keeps `cache_size` experts or, when it is None, as many as `cache_bytes` (all layers
    together; default DEFAULT_CACHE_FRACTION of `original_bytes`, the unpatched model's bytes) allows.
    """
    modules = globe_modules(model)
    if mode == "cached" and cache_size is None:
        budget = default_cache_bytes(original_bytes or dense_model_bytes(model)) if cache_bytes is None else cache_bytes
        if budget < 0:
            raise ConfigError(f"cache_bytes must be >= 0, not {budget}")
        cache_size = min(cache_capacity(m, budget // max(len(modules), 1)) for m in modules.values())
    for module in modules.values():
        module.set_mode(mode, cache_size)


def set_collect_stats(model: nn.Module, on: bool = True) -> None:
    for module in globe_modules(model).values():
        if module.cache is not None:
            module.cache.collect_stats = on


def reset_cache_stats(model: nn.Module) -> None:
    for module in globe_modules(model).values():
        if module.cache is not None:
            module.cache.reset_stats()


def cache_stats(model: nn.Module) -> dict | None:
    """Hits, misses and hit rate summed over layers, plus per layer; None when no layer has a cache."""
    per_layer = {layer: m.cache.stats() for layer, m in globe_modules(model).items() if m.cache is not None}
    if not per_layer:
        return None
    hits = sum(s["hits"] for s in per_layer.values())
    misses = sum(s["misses"] for s in per_layer.values())
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "per_layer": {str(layer): s for layer, s in per_layer.items()}}


def warm_up(model: nn.Module, counts: dict[int, torch.Tensor]) -> dict[int, list[int]]:
    """Preload every layer's cache from routing counts {layer: [E]} (see collect_routing_counts)."""
    return {layer: m.warm_up(counts[layer]) for layer, m in globe_modules(model).items() if layer in counts}
