"""Calibration runs: activation statistics of a model's routed experts on calibration text, written to one file.

    stats = run_calibrate(CalibrateRun(model_dir, "calib.txt", "stats.safetensors"))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from globe.calibration import ActivationStats, collect_stats, save_stats
from globe.device import resolve_device
from globe.eval import encode_text
from globe.export import load_model
from globe.run.tokenizer import check_text_file, load_tokenizer


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


def run_calibrate(run: CalibrateRun) -> ActivationStats:
    """Collect the statistics and write them to run.out; returns them."""
    text_path = check_text_file(run.text, "--text")
    tokenizer = load_tokenizer(run.tokenizer or run.model_dir)
    model = load_model(run.model_dir, device=str(resolve_device(run.device)))
    with text_path.open(encoding="utf-8") as fh:                          # ~4 characters per token is plenty
        text = fh.read(64 * run.max_tokens) if run.max_tokens else fh.read()
    ids = encode_text(tokenizer, text)[:run.max_tokens] if run.max_tokens else encode_text(tokenizer, text)
    stats = collect_stats(model, ids, window=run.window, per_expert=not run.layer_only,
                          info={"model_dir": str(Path(run.model_dir).resolve()), "text": str(text_path.resolve())})
    save_stats(stats, run.out)
    return stats
