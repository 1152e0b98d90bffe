"""The routed-samples format: a capped sample of the tokens routed to each expert, one safetensors file.

  inputs   [L, E, S, d]  fp32  the first S tokens (MoE-layer inputs x) routed to expert e of layer l, zero-padded
  weights  [L, E, S]     fp32  their routing weights (0 on padding)
  counts   [L, E]        int64 samples held per expert (<= S)
  layers   [L]           int64 MoE layer indices
The header metadata holds `format_version`, `kind` and `info` (JSON: activation, samples cap, tokens seen).
Written by `globe compress` for the whole-expert refinement (globe.fit.engine.expert); read back checked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from globe.errors import ArtifactError
from globe.formats.tagged import open_tagged, write_tagged

ROUTED_FORMAT_VERSION = 1
ROUTED_KIND = "globe-routed-samples"
KEYS = ("inputs", "weights", "counts", "layers")


def write_routed_file(path: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write the routed samples and their `info` atomically; returns the path."""
    return write_tagged(path, {k: tensors[k] for k in KEYS}, ROUTED_KIND, ROUTED_FORMAT_VERSION, info)


def read_routed_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info); ArtifactError naming the file and tensor if it is missing, corrupt or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"routed samples {path} not found (written by `globe compress --expert-steps N`)")
    tensors, meta = open_tagged(path)
    if meta.get("kind") != ROUTED_KIND or meta.get("format_version") != str(ROUTED_FORMAT_VERSION):
        raise ArtifactError(f"{path} is not a GloBE routed-samples file of format_version {ROUTED_FORMAT_VERSION}")
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks tensor(s) {', '.join(missing)}")
    x, w, n, layers = (tensors[k] for k in KEYS)
    if x.dim() != 4 or w.shape != x.shape[:3] or n.shape != x.shape[:2] or layers.shape != x.shape[:1]:
        raise ArtifactError(f"{path}: tensor shapes do not agree (inputs {tuple(x.shape)}, weights {tuple(w.shape)}, "
                            f"counts {tuple(n.shape)}, layers {tuple(layers.shape)})")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(w).all())) or int(n.min()) < 0 or \
            int(n.max()) > x.shape[2]:
        raise ArtifactError(f"{path}: tensor inputs/weights not finite or counts out of range")
    return tensors, json.loads(meta.get("info", "{}"))
