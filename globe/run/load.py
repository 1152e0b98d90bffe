"""Load-for-eval: the model (and tokenizer) an evaluation or benchmark run measures.

    model, tokenizer = load_for_eval(ModelLoad("path/to/model", artifact="out/", mode="cached"))

MODEL_DIR is an ordinary Hugging Face checkpoint, optionally patched with an artifact (checked against the
checkpoint's headers before the slow model load), or a compressed export, which carries its own artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from globe.artifact import check_compatible, check_same_weights
from globe.core.result import FitResult
from globe.device import compute_dtype, resolve_device
from globe.errors import ArtifactError
from globe.export import is_compressed, load_artifact, load_compressed, load_model
from globe.run.config import CacheConfig
from globe.run.tokenizer import load_tokenizer
from globe.runtime import apply_globe


@dataclass
class ModelLoad:
    """Which model to load and how: checkpoint, optional artifact, runtime mode, device, dtype, tokenizer."""

    model_dir: str
    artifact: str | FitResult | None = None   # artifact directory (or result) to patch the model with
    mode: str = CacheConfig.mode
    cache_size: int | None = None
    cache_bytes: int | None = None            # cache budget of all layers (default: a fraction of the model)
    device: str = "cpu"
    dtype: str = "auto"                       # auto: the checkpoint's dtype, float32 where the device lacks it
    tokenizer: str | None = None              # default: the model directory
    force: bool = False                       # apply the artifact even to other weights of the same shapes


def load_for_eval(spec: ModelLoad) -> tuple[nn.Module, object]:
    """(model, tokenizer) as requested: compressed checkpoint, or HF checkpoint with an optional artifact."""
    device = resolve_device(spec.device)
    if is_compressed(spec.model_dir):
        if spec.artifact:
            raise ArtifactError(f"{spec.model_dir} is a compressed checkpoint and holds its artifact; drop --globe")
        dtype = compute_dtype(spec.model_dir, device, spec.dtype)          # as asked, not silently the stored one
        model = load_compressed(spec.model_dir, mode=spec.mode, cache_size=spec.cache_size, device=device,
                                dtype=None if dtype == "auto" else dtype, cache_bytes=spec.cache_bytes,
                                force=spec.force)
    else:
        loaded = None
        if spec.artifact:
            # --globe OUT: an artifact directory or a compressed checkpoint (`globe compress` / save_pretrained)
            loaded = load_artifact(spec.artifact) if isinstance(spec.artifact, (str, Path)) else spec.artifact
            check_compatible(loaded, spec.model_dir)                     # before the (slow) model load
            check_same_weights(loaded, spec.model_dir, force=spec.force)
        model = load_model(spec.model_dir, dtype=compute_dtype(spec.model_dir, device, spec.dtype), device=str(device))
        if loaded is not None:
            apply_globe(model, loaded, mode=spec.mode, cache_size=spec.cache_size, cache_bytes=spec.cache_bytes)
    return model, load_tokenizer(spec.tokenizer or spec.model_dir)
