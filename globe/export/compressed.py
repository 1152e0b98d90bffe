"""Compressed checkpoint: everything the model keeps dense plus the GloBE artifact, and its small loader.

Directory layout (every file written atomically):
    config.json                 the model's transformers config
    globe_model.safetensors     all tensors but the factored projections, in transformers' in-memory names
                                (routers, shared experts, attention, embeddings, dense `experts.down_proj` ...)
    banks.safetensors           the GloBE artifact (globe.save), so `globe.load(dir)` works on it too
    globe_config.json
    globe_compressed.json       {"format_version", "weights", "dtype", "model_type", "families", ...}
    tokenizer*, generation_config.json   copied from the source when present

The weights file is deliberately not called model.safetensors: stock transformers refuses the directory instead of
silently initialising the missing experts at random. `load_compressed` builds the model skeleton without
initialising it, applies the artifact and loads the rest with a strict key check.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from globe.artifact import check_compatible, load, save
from globe.core.files import atomic_write_text
from globe.core.result import FitResult
from globe.errors import ArtifactError
from globe.export.files import copy_side_files, load_model, source_dir, unique_tensors, write_safetensors
from globe.io.model import experts_modules, model_arch, model_shape
from globe.runtime.apply import apply_globe, dense_parts
from globe.runtime.experts import GLOBE_STATE, GlobeExperts

log = logging.getLogger(__name__)

COMPRESSED_FORMAT_VERSION = 1
MARKER_FILE = "globe_compressed.json"
WEIGHTS_FILE = "globe_model.safetensors"


def is_compressed(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def runtime_state_dict(model: nn.Module, families: set[str] | None = None) -> dict[str, torch.Tensor]:
    """State a GloBE-patched model needs beside its artifact: all but the GloBE-owned tensors, with untouched
    projections under GlobeExperts' names (`down_proj`, ...). Works on a patched or an original model."""
    spec, _ = model_arch(model)
    state = model.state_dict()
    for layer, module in experts_modules(model).items():
        prefix = spec.experts_path(layer) + "."
        if isinstance(module, GlobeExperts):
            for key in [k for k in state if k.startswith(prefix) and k[len(prefix):].startswith(GLOBE_STATE)]:
                del state[key]
            continue
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        for family, weight in dense_parts(module, families or set()).items():
            state[f"{prefix}{family}_proj"] = weight
    return state


def save_compressed(model_or_dir: nn.Module | str | Path, artifact: FitResult | str | Path,
                    out_dir: str | Path) -> Path:
    """Write the compressed checkpoint of a model (directory or in-memory, original or patched) to out_dir."""
    model = model_or_dir if isinstance(model_or_dir, nn.Module) else load_model(model_or_dir)
    result = artifact if isinstance(artifact, FitResult) else load(artifact)
    shape = model_shape(model)
    check_compatible(result, shape)
    patched = shape.factored is not None
    out = Path(out_dir)
    spec, _ = model_arch(model)
    first = next(iter(experts_modules(model).values()))
    globe_dtype = (first.bank[first.factored[0]] if patched else first.gate_up_proj).dtype   # storage of the factors
    save(result, out, dtype=globe_dtype)      # the runtime rounds the factors to this dtype anyway
    tensors = unique_tensors(runtime_state_dict(model, set(result.families)))
    write_safetensors(out / WEIGHTS_FILE, tensors, {"format": "pt", "globe_compressed": str(COMPRESSED_FORMAT_VERSION)})
    atomic_write_text(out / "config.json", model.config.to_json_string())
    src = Path(model_or_dir) if not isinstance(model_or_dir, nn.Module) else source_dir(model)
    copied = copy_side_files(src, out)
    if "generation_config.json" not in copied and getattr(model, "generation_config", None) is not None:
        atomic_write_text(out / "generation_config.json", model.generation_config.to_json_string())
    import transformers
    marker = {"format_version": COMPRESSED_FORMAT_VERSION, "weights": WEIGHTS_FILE, "dtype": _name(model.dtype),
              "globe_dtype": _name(globe_dtype), "model_type": spec.model_type, "families": sorted(result.families),
              "transformers_version": transformers.__version__}
    atomic_write_text(out / MARKER_FILE, json.dumps(marker, indent=1))
    log.info("compressed checkpoint written to %s (%d dense tensors)", out, len(tensors))
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_marker(path: Path) -> dict:
    if not (path / MARKER_FILE).is_file():
        raise ArtifactError(f"{path} is not a GloBE compressed checkpoint (no {MARKER_FILE}); "
                            f"write one with `globe export OUT --model MODEL_DIR -o {path}`")
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path / MARKER_FILE} is not valid JSON ({exc.msg})") from None
    if int(marker.get("format_version", -1)) not in range(1, COMPRESSED_FORMAT_VERSION + 1):
        raise ArtifactError(f"{path / MARKER_FILE} has format_version {marker.get('format_version')}; this globe "
                            f"reads 1..{COMPRESSED_FORMAT_VERSION}: upgrade globe")
    return marker


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model built from config.json with weights allocated but not initialised (they are loaded next)."""
    import transformers
    from transformers.initialization import no_init_weights
    config = transformers.AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()                                   # skipped with the initialisation above
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    return model


def load_compressed(path: str | Path, mode: str = "cached", cache_size: int | None = None,
                    device: str | torch.device | None = None, collect_stats: bool = False,
                    max_gathered_pairs: int = 16) -> nn.Module:
    """A patched model from a compressed checkpoint directory (see save_compressed); logits equal the
    in-memory model patched with the same artifact."""
    path = Path(path)
    marker = _read_marker(path)
    model = _skeleton(path, getattr(torch, marker["dtype"]))
    apply_globe(model, load(path), mode=mode, cache_size=cache_size, collect_stats=collect_stats,
                dtype=getattr(torch, marker.get("globe_dtype", marker["dtype"])), max_gathered_pairs=max_gathered_pairs)
    try:
        tensors = load_file(str(path / marker["weights"]))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path / marker['weights']} ({exc}); the checkpoint is incomplete") from None
    expected = set(unique_tensors(runtime_state_dict(model)))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ArtifactError(f"{path / marker['weights']} does not fit config.json: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}; re-export the checkpoint")
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model.to(device) if device is not None else model
