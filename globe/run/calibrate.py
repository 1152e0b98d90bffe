"""Calibration runs: activation statistics of a model's routed experts on calibration text, written to one file.

    stats = run_calibrate(CalibrateRun(model_dir, "calib.txt", "stats.safetensors"))
    stats = run_calibrate(CalibrateRun(model_dir, None, "stats.safetensors", seed=0))   # text the model writes
    stats = run_calibrate(CalibrateRun(model_dir, "calib.txt", "stats.safetensors", self_tokens=8192))  # both

Without a text file the calibration text is sampled from the model itself (globe.calibration.self_text: seeded,
data-free). With a text file and self_tokens > 0 (mixed calibration) the statistics are summed over the text's
first max_tokens tokens AND self_tokens tokens the model samples itself (the same seeded sample a run without text
would take), as rows of one window each, interleaved text / self so that both reach the per-expert routed samples
(which keep the first tokens seen); a tail of the text shorter than a window is left out. stats.info["calibration"]
says where the tokens came from: {"source": "text", "text", "tokens", "read_tokens", ...} (mixed: "tokens" the text's
tokens used, "self_generated" the sample's description, "total_tokens" both) or {"source": "self-generated",
"tokens", "seed", "temperature", "length", ...}. With sensitivity, the probe of globe.calibration.sensitivity runs
on the same tokens after the statistics (stats.info["sensitivity"]: the KL per layer and family of a fixed
perturbation, which the fit turns into per-layer weights of its objective).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from globe.calibration import ActivationStats, collect_stats, save_stats
from globe.calibration.sensitivity import layer_sensitivity
from globe.calibration.self_text import SelfText, self_generated_ids, start_tokens
from globe.core import outputs
from globe.device import resolve_device
from globe.errors import ConfigError
from globe.eval import encode_text
from globe.export import load_model
from globe.run.tokenizer import check_text_file, load_tokenizer, read_text

log = logging.getLogger(__name__)
DEFAULT_TOKENS = 32768


@dataclass
class CalibrateRun:
    """Model, calibration text (None: sampled from the model), output file, and how much text in which windows."""

    model_dir: str
    text: str | None
    out: str
    max_tokens: int = DEFAULT_TOKENS          # 0 / None: the whole text (a text file only)
    window: int = 256
    layer_only: bool = False                  # per-layer statistics only (no per-expert C)
    tokenizer: str | None = None              # default: the model directory
    device: str = "cpu"
    overwrite: bool = False                   # replace an existing output file
    seed: int = 0                             # self-generated text: the sampling seed
    flag: str = "--text"                      # the option the text came from, for messages
    routed: int = 0                           # routed tokens kept per expert (stats.routed; 0: none)
    routed_mb: int = 512                      # their memory cap
    self_tokens: int = 0                      # with a text: also this many self-generated tokens (mixed; 0: none)
    sensitivity: bool = False                 # also run the sensitivity probe (stats.info["sensitivity"])


def check_calibrate_run(run: CalibrateRun) -> Path | None:
    """ConfigError / ModelDirError naming the option before any work; the text file's path (None: self-generated)."""
    if run.window < 1 or (run.max_tokens or 0) < 0:
        raise ConfigError(f"--window must be >= 1 and --max-tokens >= 0 (got --window {run.window}, "
                          f"--max-tokens {run.max_tokens})")
    if run.self_tokens < 0 or (run.self_tokens and run.text is None):
        raise ConfigError(f"self-generated tokens added to a calibration text need a text and a count >= 0 "
                          f"(got {run.self_tokens}{'' if run.text else ' without a text'})")
    if run.self_tokens:
        SelfText(tokens=run.self_tokens, length=run.window, seed=run.seed).check()
    if run.text is None:
        if not run.max_tokens or run.max_tokens < 2:
            raise ConfigError(f"self-generated calibration needs a token count >= 2 (got {run.max_tokens})")
        SelfText(tokens=run.max_tokens, length=run.window, seed=run.seed).check()
        return None
    path = check_text_file(run.text, run.flag)
    read_text(path, run.flag, 64 * run.max_tokens or None)            # UTF-8 and not empty, or one line now
    return path


def _text_ids(run: CalibrateRun, text_path: Path):
    """(ids [1, n], provenance) of the first max_tokens tokens of the text file."""
    text = read_text(text_path, run.flag, 64 * run.max_tokens or None)       # ~4 characters per token: plenty
    tokenizer = load_tokenizer(run.tokenizer or run.model_dir)
    all_ids = encode_text(tokenizer, text)
    ids = all_ids[:run.max_tokens] if run.max_tokens else all_ids
    if ids.numel() < 2:
        raise ConfigError(f"{run.flag} file {text_path} gives {ids.numel()} token(s); calibration needs at least 2, "
                          f"pass a longer text")
    if run.max_tokens and ids.numel() < run.max_tokens:
        log.warning("%s file %s has %d tokens, fewer than the %d asked for: calibrating on all of them", run.flag,
                    text_path, ids.numel(), run.max_tokens)
    info = {"source": "text", "text": str(text_path.resolve()), "tokens": int(ids.numel()),
            "read_tokens": int(all_ids.numel()), "window": run.window}
    return ids.reshape(1, -1), info


def _self_ids(model, run: CalibrateRun, tokens: int) -> tuple[torch.Tensor, dict]:
    """(ids [sequences, length], provenance) of `tokens` tokens the model samples itself, seeded with run.seed."""
    spec = SelfText(tokens=tokens, length=run.window, seed=run.seed)
    ids = self_generated_ids(model, spec)
    return ids, {**spec.describe(), "tokens": int(ids.numel()), "length": int(ids.shape[1]),
                 "start": start_tokens(model, spec), "window": run.window}


def interleave_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Rows of `first` [a, T] and `second` [b, T] alternately (first, second, first, ...), the longer one's
    surplus at the end: [a + b, T]."""
    both = min(first.shape[0], second.shape[0])
    paired = torch.stack([first[:both], second[:both]], dim=1).reshape(2 * both, first.shape[1])
    return torch.cat([paired, first[both:], second[both:]])


def _mixed_ids(model, run: CalibrateRun, text_ids: torch.Tensor, info: dict) -> tuple[torch.Tensor, dict]:
    """The text's whole windows [n // L, L] interleaved with run.self_tokens self-generated tokens [s, L] (L: the
    sample's sequence length, the window unless the model's context is shorter)."""
    own, own_info = _self_ids(model, run, run.self_tokens)
    length = own.shape[1]
    rows = text_ids.numel() // length
    if rows == 0:
        raise ConfigError(f"{run.flag} {info['text']} gives {text_ids.numel()} token(s), fewer than one window "
                          f"({length}); mixed calibration needs at least one: pass a longer text, or --calibration-mix 0 "
                          f"for the text alone")
    if text_ids.numel() % length:
        log.info("mixed calibration: the last %d token(s) of the text's %d (less than a window of %d) are left out",
                 text_ids.numel() % length, text_ids.numel(), length)
    text_rows = text_ids.reshape(-1)[:rows * length].view(rows, length)
    ids = interleave_rows(text_rows, own)
    info = {**info, "tokens": int(text_rows.numel()), "self_generated": own_info, "total_tokens": int(ids.numel())}
    log.info("mixed calibration: %d tokens of %s and %d self-generated, interleaved by window", text_rows.numel(),
             info["text"], own.numel())
    return ids, info


def run_calibrate(run: CalibrateRun) -> ActivationStats:
    """Collect the statistics and write them to run.out; returns them. The output file is never an input,
    is replaced only with overwrite, and is locked while the run lasts (globe.core.outputs.claim_output_file)."""
    return run_calibrate_with_ids(run)[0]


def run_calibrate_with_ids(run: CalibrateRun) -> tuple[ActivationStats, torch.Tensor]:
    """run_calibrate, also returning the calibration token ids [sequences, length] (a text: [1, n])."""
    text_path = check_calibrate_run(run)
    inputs = [run.model_dir, text_path, run.tokenizer]
    with outputs.claim_output_file(run.out, "calibrate", run.overwrite, inputs=inputs):
        model = load_model(run.model_dir, device=str(resolve_device(run.device)))   # validates the directory
        if text_path is not None:
            ids, info = _text_ids(run, text_path)
            if run.self_tokens:
                ids, info = _mixed_ids(model, run, ids, info)
        else:
            ids, info = _self_ids(model, run, run.max_tokens)
        stats = collect_stats(model, ids, window=run.window, per_expert=not run.layer_only,
                              info={"model_dir": str(Path(run.model_dir).resolve()), "text": info.get("text"),
                                    "calibration": info}, routed=run.routed, routed_mb=run.routed_mb)
        if run.sensitivity:                        # globe.calibration.sensitivity, in fp32 on the same tokens
            stats.info["sensitivity"] = layer_sensitivity(model.float(), ids, stats, window=run.window)
        save_stats(stats, run.out)
    return stats, ids
