"""Export runs: an artifact applied to its model, saved as a compressed or a dense Hugging Face checkpoint.

    out = run_export(ExportRun("out/", "hf/", model="path/to/model", dense=True))

The artifact is checked against the model's headers and the output directory before the model is loaded; an
output directory the run created is removed again when the export fails on bad input.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from globe.artifact import check_compatible, load
from globe.core.result import FitResult
from globe.device import resolve_device
from globe.errors import GlobeError, ModelDirError
from globe.export import export_dense, load_model, save_compressed
from globe.run.config import ExportConfig
from globe.run.output_dir import check_output_dir


@dataclass
class ExportRun:
    """One export: artifact directory, output directory, the model it was fitted on, and the format."""

    artifact: str
    out: str
    model: str | None = None                  # default: the model_dir recorded in the artifact
    dense: bool = False
    max_shard_size: str = ExportConfig.max_shard_size
    device: str = "cpu"
    overwrite: bool = False


def model_dir_of(model: str | None, result: FitResult) -> Path:
    """`model`, else the directory recorded in the artifact; ModelDirError when neither exists."""
    model = model or result.source.get("model_dir")
    if not model or not Path(model).is_dir():
        raise ModelDirError(f"model directory {model!r} not found; pass --model MODEL_DIR (the checkpoint the "
                            f"artifact was fitted on)")
    return Path(model)


def run_export(run: ExportRun) -> Path:
    """Write the export; returns its directory."""
    result = load(run.artifact)
    model_dir = model_dir_of(run.model, result)
    check_compatible(result, model_dir)
    out_dir = Path(run.out)
    created = not out_dir.exists()
    check_output_dir(out_dir, run.overwrite, what_out="export")
    try:
        device = resolve_device(run.device)
        model = load_model(model_dir, device=None if device.type == "cpu" else str(device))   # the checkpoint's dtype
        if run.dense:
            return export_dense(model, result, run.out, max_shard_size=run.max_shard_size)
        return save_compressed(model, result, run.out)
    except GlobeError:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)         # leave nothing half-made behind
        raise


def export_message(run: ExportRun, out: Path) -> str:
    """The line both front ends print after an export."""
    if run.dense:
        return f"dense checkpoint written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)"
    return f"compressed checkpoint written to {out} (load it with globe.load_compressed or `globe eval {out}`)"
