"""Export runs: an artifact applied to its model, saved as a compressed or a dense Hugging Face checkpoint.

    out = run_export(ExportRun("out/", "hf/", model="path/to/model", dense=True))

The artifact is checked against the model's headers and weights and the output directory before the model is
loaded; an output directory the run created is removed again when the export fails.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from globe.artifact import check_compatible, check_same_weights
from globe.core import outputs
from globe.core.result import FitResult
from globe.device import resolve_device
from globe.errors import ConfigError, ModelDirError, OutputError
from globe.export import export_dense, load_artifact, load_model, save_compressed
from globe.run.config import ExportConfig


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
    force: bool = False                       # apply even to other weights of the same shapes (warns)


def model_dir_of(model: str | None, result: FitResult) -> Path:
    """`model`, else the directory recorded in the artifact; ModelDirError when neither exists."""
    model = model or result.source.get("model_dir")
    if not model or not Path(model).is_dir():
        raise ModelDirError(f"model directory {model!r} not found; pass --model MODEL_DIR (the checkpoint the "
                            f"artifact was fitted on)")
    return Path(model)


SHARD_SIZE = re.compile(r"^\s*([1-9]\d*)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)


def shard_size(value: str | int) -> str | int:
    """--max-shard-size as transformers takes it ("5GB", "500MiB", or bytes); ConfigError otherwise."""
    match = SHARD_SIZE.match(str(value))
    if match is None:
        raise ConfigError(f"--max-shard-size {value!r} is not a size: pass an integer with a unit, e.g. 5GB or 500MB")
    return int(match[1]) if match[2] is None else f"{match[1]}{match[2].upper()}"


def run_export(run: ExportRun) -> Path:
    """Write the export; returns its directory. Checked before the model is loaded: the artifact, that it fits
    the model's shapes and weights, the size option, and OUT (globe.core.outputs.claim_output_dir: never an input,
    --overwrite, one run at a time, crash debris removed, a created OUT removed again on failure)."""
    max_shard_size = shard_size(run.max_shard_size)
    result = load_artifact(run.artifact)              # an artifact directory or a compressed checkpoint
    model_dir = model_dir_of(run.model, result)
    check_compatible(result, model_dir)
    check_same_weights(result, model_dir, force=run.force)
    device = resolve_device(run.device)
    out = Path(run.out)
    with outputs.claim_output_dir(out, "export", run.overwrite, what="export", inputs=[model_dir, run.artifact]):
        try:
            model = load_model(model_dir, device=None if device.type == "cpu" else str(device))   # its dtype
            if run.dense:
                return export_dense(model, result, out, max_shard_size=max_shard_size)
            return save_compressed(model, result, out, max_shard_size=max_shard_size)   # staged, swapped in whole
        except SafetensorError as exc:                 # transformers' writer: disk full, ...
            raise OutputError(f"cannot write the export into {out}: {exc}") from None


def export_message(run: ExportRun, out: Path) -> str:
    """The line both front ends print after an export."""
    if run.dense:
        return f"dense checkpoint written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)"
    return (f"compressed checkpoint written to {out} (load it with AutoModelForCausalLM.from_pretrained after "
            f"`import globe`, or `globe eval {out}`)")
