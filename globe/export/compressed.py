"""Compressed checkpoint: a model patched by apply_globe in transformers' own format, loadable after `import globe`.

    save_compressed("path/to/model", "art/", "compressed/")       # or an in-memory model (original or patched)
    model = AutoModelForCausalLM.from_pretrained("compressed/", dtype=torch.bfloat16)   # after `import globe`
    model = load_compressed("compressed/", mode="cached", dtype=torch.float32, device="cuda")

Directory layout (every file moved into place atomically):
    config.json                 the model's config plus `quantization_config` {"quant_method": "globe", ...}
                                (see globe.export.hf_quantizer)
    model.safetensors           the patched model's state dict: banks once, per-layer adapters / sparse codes /
                                untouched projections, everything else as transformers stores it; factors in
                                the dtype the model was patched with (by default the checkpoint's)
    globe_config.json           provenance of the fit: source, config, params, metrics (no tensors)
    tokenizer*, generation_config.json   copied from the source when present

Checkpoints of format 1 (globe_compressed.json + globe_model.safetensors + banks.safetensors) are still read by
load_compressed.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from globe.artifact import check_compatible, fit_config, load
from globe.core.files import atomic_write_text
from globe.core.result import FitResult
from globe.errors import ArtifactError
from globe.export.files import (check_finite_weights, copy_side_files, load_model, source_dir, staged_output,
                                swap_in, unique_tensors)
from globe.formats.artifact import BANKS_FILE, CONFIG_FILE, config_document, read_document
from globe.formats.validate import (HASH_KEY, deferred, read_headers, tensors_hash, validate_checkpoint,
                                    verify_content)
from globe.formats.checkpoint import (MARKER_FILE, PACKED_BUFFERS, QUANT_METHOD, WEIGHTS_FILE, dense_key,
                                      family_from_layers, is_compressed, is_globe_state, open_weights, read_marker)
from globe.io.model import experts_modules, model_arch, model_shape
from globe.runtime.apply import apply_globe, set_collect_stats, set_mode
from globe.runtime.build import dense_parts
from globe.runtime.experts import GlobeExperts

log = logging.getLogger(__name__)


def runtime_state_dict(model: nn.Module, families: set[str] | None = None) -> dict[str, torch.Tensor]:
    """State a GloBE-patched model needs beside its artifact: all but the GloBE-owned tensors, with untouched
    projections under GlobeExperts' names (`down_proj`, ...). Works on a patched or an original model."""
    spec, _ = model_arch(model)
    state = model.state_dict()
    for layer, module in experts_modules(model).items():
        prefix = spec.experts_path(layer) + "."
        if isinstance(module, GlobeExperts):
            for key in [k for k in state if k.startswith(prefix) and is_globe_state(k[len(prefix):])]:
                del state[key]
            continue
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        for family, weight in dense_parts(module, spec.layout, families or set()).items():
            state[prefix + dense_key(family)] = weight
    return state


def _patched(model_or_dir: nn.Module | str | Path, result: FitResult) -> nn.Module:
    """The model patched with `result`: loaded from a directory, or a patched copy of an in-memory original."""
    import copy
    if not isinstance(model_or_dir, nn.Module):
        return apply_globe(load_model(model_or_dir), result, mode="factored")
    check_compatible(result, model_shape(model_or_dir))
    if any(isinstance(m, GlobeExperts) for m in experts_modules(model_or_dir).values()):
        return model_or_dir
    return apply_globe(copy.deepcopy(model_or_dir), result, mode="factored")


def save_compressed(model_or_dir: nn.Module | str | Path, artifact: FitResult | str | Path,
                    out_dir: str | Path, max_shard_size: str | int = "5GB", mode: str | None = None,
                    finish: Callable[[Path], None] | None = None) -> Path:
    """Write the compressed checkpoint of a model (directory or in-memory, original or patched) to out_dir.

    It is `save_pretrained` of the patched model (factors in the dtype it was patched with: for a directory, the
    checkpoint's dtype) plus the fit's globe_config.json (with the content hash of the checkpoint's tensors) and
    the source's tokenizer files. Everything is written into a staging directory beside out_dir (then `finish`
    (staging) adds what the caller writes: a model card, metrics), which replaces out_dir whole
    (globe.export.files.swap_in): a crash leaves the old checkpoint or the new one, never a mix. The user's other
    files in out_dir are kept. mode: the runtime mode the checkpoint loads in (default: a patched model's own,
    else `cached`)."""
    result = artifact if isinstance(artifact, FitResult) else load(artifact)
    patched = any(isinstance(m, GlobeExperts) for m in experts_modules(model_or_dir).values()) \
        if isinstance(model_or_dir, nn.Module) else False
    model = _patched(model_or_dir, result)
    out = Path(out_dir)
    quant = model.config.quantization_config
    saved_mode = quant["mode"] if isinstance(quant, dict) else quant.mode
    new_mode = mode or (saved_mode if patched else "cached")
    staging = staged_output(out)
    try:
        _set_quant_mode(quant, new_mode)
        try:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        finally:
            _set_quant_mode(quant, saved_mode)
        doc = {**config_document(result), HASH_KEY: {"algorithm": "sha256", "tensors": tensors_hash(staging)}}
        atomic_write_text(staging / CONFIG_FILE, json.dumps(doc, indent=1, default=float))
        src = Path(model_or_dir) if not isinstance(model_or_dir, nn.Module) else source_dir(model)
        copied = copy_side_files(src, staging, skip=tuple(p.name for p in staging.iterdir()))
        if finish is not None:
            finish(staging)
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("compressed export in %s; copied %s", out, ", ".join(copied) or "none")
    return out


def _set_quant_mode(quant, mode: str) -> None:
    if isinstance(quant, dict):
        quant["mode"] = mode
    else:
        quant.mode = mode


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model built from config.json with weights allocated but not initialised (they are loaded next)."""
    import transformers
    from transformers.initialization import no_init_weights
    from globe.io import get_arch, read_config
    from globe.io.arch import validate_config
    raw = read_config(path)
    validate_config(raw, get_arch(raw), path / "config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:            # whatever transformers rejects in the user's config.json
        raise ArtifactError(f"{path / 'config.json'} cannot be read by transformers ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); re-export the checkpoint") from None
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()                                   # skipped with the initialisation above
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    return model


def load_compressed(path: str | Path, mode: str | None = None, cache_size: int | None = None,
                    device: str | torch.device | None = None, collect_stats: bool = False,
                    max_gathered_pairs: int | None = None, dtype: torch.dtype | str | None = None,
                    cache_bytes: int | None = None, force: bool = False) -> nn.Module:
    """A patched model from a compressed checkpoint directory (see save_compressed): from_pretrained with the
    runtime mode (default: the checkpoint's), cache size or budget, dtype (default: as stored) and device asked for.
    Logits equal the original model patched with the same artifact, in the same dtype and mode. The checkpoint
    is validated first (globe.formats.validate); force: a content-hash mismatch only warns."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        model = _load_format_1(path, mode or "cached", cache_size, collect_stats, max_gathered_pairs or 16, dtype)
        return model.to(device) if device is not None else model
    import transformers
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} is not a GloBE compressed checkpoint (no config.json); write one with "
                            f"`globe export ART --model MODEL_DIR -o {path}`")
    if not is_compressed(path):
        raise ArtifactError(f"{path} is not a GloBE compressed checkpoint (config.json has no quantization_config "
                            f"with quant_method 'globe'); write one with `globe export ART --model MODEL_DIR -o {path}`")
    validate_checkpoint(path, force=force)                # before any tensor is used (untrusted input)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    if quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{path} is not a GloBE compressed checkpoint (config.json has no quantization_config "
                            f"with quant_method 'globe'); write one with `globe export ART --model MODEL_DIR -o {path}`")
    quant.update({k: v for k, v in {"mode": mode, "cache_bytes": cache_bytes,
                                    "max_gathered_pairs": max_gathered_pairs}.items() if v is not None})
    config.quantization_config = quant
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ArtifactError(f"no model.safetensors in {path}: the checkpoint is incomplete; re-export it")
    with deferred(path):                                 # its content hash: verified below
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto",
                                                                        device_map=device, output_loading_info=True,
                                                                        trust_remote_code=False)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected or info.get("mismatched_keys"):
        raise ArtifactError(f"{weights[0]} does not fit config.json: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, mismatched {sorted(info.get('mismatched_keys') or [])[:3]}; "
                            "re-export the checkpoint")
    check_finite_weights(model, weights[0])              # banks, adapters, codes and the rest: no NaN/Inf
    verify_content(path, force)                          # the recorded content hash, before any tensor is used
    if cache_size is not None:
        set_mode(model, quant.get("mode", "cached"), cache_size)
    set_collect_stats(model, collect_stats)
    return model.eval()


def _load_format_1(path: Path, mode: str, cache_size: int | None, collect_stats: bool, max_gathered_pairs: int,
                   dtype: torch.dtype | str | None) -> nn.Module:
    """A format-1 checkpoint (globe_compressed.json + globe_model.safetensors + banks.safetensors)."""
    marker = read_marker(path)
    model_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _skeleton(path, model_dtype or getattr(torch, marker["dtype"]))
    factor_dtype = model_dtype or getattr(torch, marker.get("globe_dtype", marker["dtype"]))
    apply_globe(model, load(path), mode=mode, cache_size=cache_size, collect_stats=collect_stats,
                dtype=factor_dtype, max_gathered_pairs=max_gathered_pairs)
    try:
        tensors = load_file(str(path / marker["weights"]))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path / marker['weights']} ({exc}); the checkpoint is incomplete") from None
    expected = set(unique_tensors(runtime_state_dict(model)))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ArtifactError(f"{path / marker['weights']} does not fit config.json: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}; re-export the checkpoint")
    model.load_state_dict({k: v.to(model_dtype) if model_dtype and v.is_floating_point() else v
                           for k, v in tensors.items()}, strict=False)
    return model.eval()


def load_artifact(path: str | Path, force: bool = False) -> FitResult:
    """The FitResult an artifact directory or a compressed checkpoint holds (for plots, `globe export`, info).

    From a compressed checkpoint the factors come from model.safetensors (fp32, exactly the stored values) and the
    provenance from globe_config.json; the z-score scales are folded into the adapters there, so they read 1."""
    path = Path(path)
    if not is_compressed(path) or (path / MARKER_FILE).is_file():
        return load(path)
    from globe.io.arch import get_arch
    config = validate_checkpoint(path, force=force)
    verify_content(path, force)
    doc = read_document(path / CONFIG_FILE)
    spec, families = get_arch(config), {}
    with open_weights(path) as tensors:
        for name in config["quantization_config"]["families"]:
            families[name] = family_from_layers(name, spec, config, tensors, doc)
    return FitResult(families=families, config=fit_config(doc, path / CONFIG_FILE), source=doc.get("source", {}),
                     timings=doc.get("timings", {}))


def describe_compressed(path: str | Path, force: bool = False) -> dict:
    """What a compressed checkpoint is, from its JSON files only: source, families, mode, params and bytes."""
    path = Path(path)
    quant = validate_checkpoint(path, force)["quantization_config"]
    verify_content(path, force)                          # what it describes is what the files hold
    doc = read_document(path / CONFIG_FILE)
    inv = doc.get("source", {}).get("inventory") or {}
    params, total = doc.get("params", {}), inv.get("total_params")
    saved = sum(params[f"dense_{f}"] - params[f] for f in quant.get("families", {}) if f in params)
    return {"compressed": True, "path": str(path), "source": doc.get("source", {}).get("model_dir"),
            "model_type": doc.get("source", {}).get("model_type"), "quant_method": quant.get("quant_method"),
            "format_version": quant.get("format_version"), "mode": quant.get("mode"),
            "families": {f: {**v, "params": params.get(f), "dense_params": params.get(f"dense_{f}"),
                             "rel_err": doc.get("metrics", {}).get(f, {}).get("rel_err"),
                             "fit_quant": doc.get("families", {}).get(f, {}).get("quant")}
                         for f, v in quant.get("families", {}).items()},
            "total_params_before": total, "total_params_after": total - saved if total else None,
            "total_cut": saved / total if total else None,
            "bytes_on_disk": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "packed_bytes": stored_packed_bytes(path)}


def stored_packed_bytes(path: Path) -> int:
    """Bytes of the packed (quantized) parts' tensors of a compressed checkpoint, from its headers."""
    return sum(info["data_offsets"][1] - info["data_offsets"][0] for name, (_, info) in read_headers(path).items()
               if name.rpartition(".")[2] in PACKED_BUFFERS and is_globe_state(_module_key(name)))


def _module_key(name: str) -> str:
    """`bank.gate.codes` of `model.layers.0.mlp.experts.bank.gate.codes`: the key under the experts module."""
    parts = name.split(".")
    return ".".join(parts[-3:])
