"""A safetensors file tagged with its kind and format version (metadata `kind`, `format_version`, `info` as JSON):
the shared writer and opener of the activation statistics (globe.formats.stats) and routed samples
(globe.formats.routed) files. Each format checks its own kind, version and tensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from globe.core.files import atomic_write
from globe.errors import ArtifactError


def write_tagged(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, version: int,
                 info: dict[str, Any]) -> Path:
    """Write `tensors` with the kind, format version and `info` (JSON) atomically; returns the path."""
    path = Path(path)
    meta = {"format_version": str(version), "kind": kind, "info": json.dumps(info, default=str)}
    atomic_write(path, lambda tmp: save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                                             metadata=meta))
    return path


def open_tagged(path: Path, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ArtifactError naming the file when it is not one (+ `hint`)."""
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt or not a safetensors file ({exc}){hint}") from None
