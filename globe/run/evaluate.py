"""Evaluation runs: one model's report (`globe eval`), lm-eval tasks, and the original-vs-modes benchmark
(`globe bench`), each on a model from globe.run.load.

    report = evaluate_model(ModelLoad(model_dir, artifact="out/"), EvalText(text="heldout.txt"))
    doc = run_bench(model_dir, "out/", ["cached", "dense"], EvalText(), ModelLoad(model_dir))
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from globe import tracking
from globe.artifact import BANKS_FILE
from globe.assets import DEFAULT_MODEL_DIR
from globe.core.files import atomic_write_text
from globe.errors import ArtifactError
from globe.eval import encode_text, evaluate
from globe.eval.harness import run_tasks
from globe.eval.plots import write_plots
from globe.run.config import CacheConfig
from globe.run.load import ModelLoad, load_for_eval
from globe.run.tokenizer import read_text

log = logging.getLogger(__name__)
DEFAULT_TEXT = DEFAULT_MODEL_DIR / "heldout.txt"


@dataclass
class EvalText:
    """What an evaluation measures on: text, perplexity windows, timings, cache warm-up."""

    text: str = str(DEFAULT_TEXT)
    calib: str | None = None                  # cache warm-up text (default: the first warmup_tokens of text)
    warmup_tokens: int = CacheConfig.warmup_tokens
    max_length: int = 256
    stride: int | None = None
    max_tokens: int | None = None
    prefill_tokens: int = 256
    decode_tokens: int = 32
    repeats: int = 3
    hit_tokens: int = 256
    no_speed: bool = False


def evaluate_model(spec: ModelLoad, text: EvalText) -> dict:
    """evaluate() of the model described by spec, as a JSON-serialisable report."""
    model, tokenizer = load_for_eval(spec)
    body = read_text(text.text, "--text")
    calib = read_text(text.calib, "--calib") if text.calib else encode_text(tokenizer, body)[:text.warmup_tokens]
    report = evaluate(model, tokenizer, body, max_length=text.max_length, stride=text.stride,
                      max_tokens=text.max_tokens, prefill_tokens=text.prefill_tokens,
                      decode_tokens=text.decode_tokens, repeats=text.repeats, calibration_text=calib,
                      hit_tokens=text.hit_tokens, skip_speed=text.no_speed)
    report["model"]["path"] = str(spec.model_dir)
    report["model"]["artifact"] = spec.artifact
    return report


def run_eval(spec: ModelLoad, text: EvalText, metrics: str | None = None, plots: str | None = None,
             sweep: str | None = None) -> dict:
    """evaluate_model with the report appended to `metrics` (JSONL), and PNG plots of the artifact into `plots`."""
    with tracking.session(jsonl=metrics):
        report = evaluate_model(spec, text)
        tracking.emit("eval", **report)
    if plots:
        artifact = spec.artifact or (spec.model_dir if (Path(spec.model_dir) / BANKS_FILE).is_file() else None)
        report["plots"] = [str(p) for p in write_plots(plots, artifact=artifact, sweep=sweep)]
    return report


def run_eval_tasks(spec: ModelLoad, tasks: list[str], **options) -> dict:
    """lm-evaluation-harness tasks on the model described by spec (options: see globe.eval.harness.run_tasks)."""
    model, tokenizer = load_for_eval(spec)
    report = run_tasks(model, tokenizer, tasks, **options)
    report["model"] = {"path": str(spec.model_dir), "artifact": spec.artifact, "mode": spec.mode}
    return report


def bench_summary(reports: dict[str, dict]) -> dict[str, dict]:
    """Per variant: perplexity (and ratio to the original), tokens/s, routed ratio, peak memory."""
    base = reports.get("original", {}).get("perplexity", {}).get("perplexity")
    out = {}
    for name, rep in reports.items():
        ppl = rep["perplexity"]["perplexity"]
        out[name] = {"perplexity": ppl, "perplexity_ratio": ppl / base if base else None,
                     "prefill_tok_s": rep.get("speed", {}).get("prefill_tok_s"),
                     "decode_tok_s": rep.get("speed", {}).get("decode_tok_s"),
                     "cache_hit_rate": (rep.get("cache") or {}).get("hit_rate"),
                     "routed_ratio": rep["footprint"]["routed_ratio"], "total_ratio": rep["footprint"]["total_ratio"],
                     "peak_rss_mb": rep["memory"]["peak_rss_mb"], "cuda_peak_mb": rep["memory"].get("cuda_peak_mb")}
    return out


def run_bench(spec: ModelLoad, modes: list[str], text: EvalText, original: bool = True,
              metrics: str | None = None, out: str | None = None) -> dict:
    """The original model (unless original=False) and spec.artifact in each of `modes`, on the same text:
    {"model_dir", "artifact", "summary", "reports"}, also written to `out` (JSON) when given."""
    variants = ([("original", "")] if original else []) + [(mode, spec.artifact) for mode in
                                                            (modes if spec.artifact else [])]
    if not variants:
        raise ArtifactError("nothing to benchmark: pass --globe OUT or drop --no-original")
    reports = {}
    with tracking.session(jsonl=metrics):
        for name, artifact in variants:
            log.info("bench: %s", name)
            variant = dataclasses.replace(spec, artifact=artifact, mode=name if artifact else spec.mode)
            reports[name] = evaluate_model(variant, text)
            tracking.emit("bench", variant=name, **reports[name])
    doc = {"model_dir": str(spec.model_dir), "artifact": spec.artifact, "summary": bench_summary(reports),
           "reports": reports}
    if out:
        atomic_write_text(Path(out), json.dumps(doc, indent=1))
    return doc
