"""Dense export: W_i = A_i tilde_B_i written back as an ordinary Hugging Face checkpoint.

    export_dense("path/to/model", "out/", "dense_hf/")      # or an in-memory model (original or patched)
    AutoModelForCausalLM.from_pretrained("dense_hf/")        # stock transformers: no missing/unexpected keys

The reconstructed gate/up (and down, when fitted) weights replace the routed experts in the model's in-memory
state dict, in the experts' dtype and in the architecture's ExpertsLayout (globe.io.layout). They are computed
exactly as the runtime's `dense` mode computes them (factors
rounded to the storage dtype, product in fp32), so the export and the patched model agree. transformers' own
`save_pretrained` then writes the hub layout (per-expert keys) into a staging directory beside the output, which
replaces it whole (globe.export.files.swap_in). Tokenizer files and the generation config of the source directory
are copied along.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from globe.artifact import check_compatible, load
from globe.core.result import FitResult
from globe.export.files import copy_side_files, load_model, source_dir, staged_output, swap_in
from globe.formats.load_guard import unmarked
from globe.io.layout import ExpertsLayout
from globe.io.model import experts_modules, model_arch, model_shape
from globe.progress import progress
from globe.runtime.apply import layer_rows
from globe.runtime.build import dense_parts
from globe.runtime.experts import PROJECTIONS, GlobeExperts
from globe.runtime.reconstruct import reconstruct_rows

log = logging.getLogger(__name__)
_ABSENT = object()


def _resolve(model_or_dir: nn.Module | str | Path, artifact: FitResult | str | Path) -> tuple[nn.Module, FitResult]:
    model = model_or_dir if isinstance(model_or_dir, nn.Module) else load_model(model_or_dir)
    result = artifact if isinstance(artifact, FitResult) else load(artifact)
    return model, result


def experts_dtype(module: nn.Module, layout: ExpertsLayout) -> torch.dtype:
    """Dtype of a layer's routed experts in the source model (original module or GlobeExperts)."""
    return module.source_dtype if isinstance(module, GlobeExperts) else layout.dtype(module)


def dense_state_dict(model: nn.Module, result: FitResult) -> dict[str, torch.Tensor]:
    """The model's in-memory (fused) state dict with every fitted projection replaced by A_i tilde_B_i."""
    shape = model_shape(model)
    check_compatible(result, shape)
    patched = shape.factored is not None
    modules = experts_modules(model)
    spec, _ = model_arch(model)
    state = model.state_dict()
    rows = {name: layer_rows(fam, shape.moe_layers, shape.num_experts) for name, fam in result.families.items()}
    for layer, module in progress(modules.items(), "reconstruct", len(modules)):
        prefix = spec.experts_path(layer) + "."
        dtype, device = experts_dtype(module, spec.layout), next(module.parameters()).device
        if patched:                     # from the factors as the runtime stores them (== its `dense` mode)
            parts = {f: module.reconstruct(f) if f in module.factored else module.dense_weight(f)
                     for f in PROJECTIONS}
        else:                           # factors rounded to the dtype apply_globe would store them in
            dense = dense_parts(module, spec.layout, set(result.families))
            parts = {f: reconstruct_rows(result.families[f], rows[f][layer], factor_dtype=dtype).to(device)
                     if f in result.families else dense[f] for f in PROJECTIONS}
        parts = {f: w.detach().to(dtype) for f, w in parts.items()}
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + name: w for name, w in spec.layout.state(parts).items()})
    return state


@contextmanager
def hub_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make save_pretrained write per-expert hub keys even for a model loaded from a fused checkpoint.

    transformers reverts the conversions it applied at load time; a fused source applied none, so its
    `_weight_conversions` would write fused keys. Probing one layer tells; the default mapping is then used.
    """
    from transformers.core_model_loading import revert_weight_conversion
    spec, _ = model_arch(model)
    layer = next(iter(experts_modules(model)))
    keys = [k for k in state if k.startswith(spec.experts_path(layer) + ".")]
    fused = set(keys) & set(revert_weight_conversion(model, {k: state[k] for k in keys}))
    saved = model.__dict__.get("_weight_conversions", _ABSENT)
    if fused:
        model._weight_conversions = None
    try:
        yield
    finally:
        if fused and saved is _ABSENT:
            del model._weight_conversions
        elif fused:
            model._weight_conversions = saved


@contextmanager
def unquantized(model: nn.Module) -> Iterator[None]:
    """Hide a patched model's GloBE `quantization_config` and quantizer while save_pretrained writes dense weights
    (the dense checkpoint is an ordinary one: stock transformers must load it as such)."""
    config = getattr(model, "config", None)
    saved = {"config": config.__dict__.pop("quantization_config", _ABSENT) if config is not None else _ABSENT,
             "model": model.__dict__.pop("hf_quantizer", _ABSENT)}
    try:
        yield
    finally:
        if saved["config"] is not _ABSENT:
            config.quantization_config = saved["config"]
        if saved["model"] is not _ABSENT:
            model.hf_quantizer = saved["model"]


def export_dense(model_or_dir: nn.Module | str | Path, artifact: FitResult | str | Path, out_dir: str | Path,
                 max_shard_size: str | int = "5GB") -> Path:
    """Write a dense-reconstructed checkpoint in the model's Hugging Face format to out_dir; returns out_dir."""
    model, result = _resolve(model_or_dir, artifact)
    out = Path(out_dir)
    state = dense_state_dict(model, result)
    staging = staged_output(out)                 # written whole beside OUT, then swapped in (one step)
    try:
        with hub_layout(model, state), unquantized(model), unmarked(getattr(model, "config", None)):
            model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        src = Path(model_or_dir) if not isinstance(model_or_dir, nn.Module) else source_dir(model)
        copied = copy_side_files(src, staging, skip=tuple(p.name for p in staging.iterdir()))
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("dense export in %s; copied %s", out, ", ".join(copied) or "none")
    return out
