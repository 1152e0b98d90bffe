"""Calibration runs: activation statistics of a model's routed experts on calibration text, written to one file.

    stats = run_calibrate(CalibrateRun(model_dir, "calib.txt", "stats.safetensors"))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from globe.calibration import ActivationStats, collect_stats, save_stats
from globe.core import outputs
from globe.device import resolve_device
from globe.errors import ConfigError
from globe.eval import encode_text
from globe.export import load_model
from globe.run.tokenizer import check_text_file, load_tokenizer, read_text


@dataclass
class CalibrateRun:
    """Model, calibration text, output file, and how much of the text to run through in which windows."""

    model_dir: str
    text: str
    out: str
    max_tokens: int = 32768                   # 0 / None: the whole text
    window: int = 256
    layer_only: bool = False                  # per-layer statistics only (no per-expert C)
    tokenizer: str | None = None              # default: the model directory
    device: str = "cpu"
    overwrite: bool = False                   # replace an existing output file
    text_flag: str = "--text"                 # the option the user gave the text with (errors name it)


def run_calibrate(run: CalibrateRun) -> ActivationStats:
    """Collect the statistics and write them to run.out; returns them. The output file is never an input,
    is replaced only with overwrite, and is locked while the run lasts (globe.core.outputs.claim_output_file)."""
    if run.window < 1 or (run.max_tokens or 0) < 0:
        raise ConfigError(f"--window must be >= 1 and --max-tokens >= 0 (got --window {run.window}, "
                          f"--max-tokens {run.max_tokens})")
    text_path = check_text_file(run.text, run.text_flag)
    inputs = [run.model_dir, text_path, run.tokenizer]
    with outputs.claim_output_file(run.out, "calibrate", run.overwrite, inputs=inputs):
        text = read_text(text_path, run.text_flag, 64 * run.max_tokens or None)   # ~4 characters per token: plenty
        model = load_model(run.model_dir, device=str(resolve_device(run.device)))   # validates the directory
        tokenizer = load_tokenizer(run.tokenizer or run.model_dir)
        ids = encode_text(tokenizer, text)[:run.max_tokens] if run.max_tokens else encode_text(tokenizer, text)
        if ids.numel() < 2:
            raise ConfigError(f"{run.text_flag} file {text_path} gives {ids.numel()} token(s); calibration needs at least 2, "
                              f"pass a longer text")
        stats = collect_stats(model, ids, window=run.window, per_expert=not run.layer_only,
                              info={"model_dir": str(Path(run.model_dir).resolve()), "text": str(text_path.resolve())})
        save_stats(stats, run.out)
    return stats
