"""Evaluation runs: one model's report (`globe eval`), lm-eval tasks, and the original-vs-modes benchmark
(`globe bench`), each on a model from globe.run.load.

    report = evaluate_model(ModelLoad(model_dir, artifact="out/"), EvalText(text="heldout.txt"))
    report["divergence"]     # KL(original || compressed) per token, top-1 agreement (globe.eval.divergence)

A compressed model is compared with its original (original_for: the model under --globe, the source a compressed
checkpoint records, or --original) on the same windows, after its own perplexity, speed and memory are measured.
    doc = run_bench(model_dir, "out/", ["cached", "dense"], EvalText(), ModelLoad(model_dir))
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from globe import tracking
from globe.formats.artifact import BANKS_FILE, CONFIG_FILE
from globe.assets import DEFAULT_MODEL_DIR
from globe.core import outputs
from globe.core.files import atomic_write_text
from globe.core.result import FitResult
from globe.device import compute_dtype, resolve_device
from globe.errors import ArtifactError, GlobeError, ModelDirError
from globe.eval import divergence, encode_text, evaluate
from globe.eval.harness import prepare_tasks, run_tasks
from globe.eval.plots import PLOT_FILES, check_sweep_model, sweep_model, write_plots
from globe.formats.sweep import read_sweep
from globe.artifact import check_same_weights
from globe.export import is_compressed, load_artifact, load_model
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


def _source_of(spec: ModelLoad) -> Path:
    """The checkpoint a model comes from (a compressed export's source)."""
    if is_compressed(spec.model_dir):
        from globe.export.compressed import describe_compressed
        return Path(describe_compressed(spec.model_dir).get("source") or spec.model_dir).resolve()
    return Path(spec.model_dir).resolve()


def original_for(spec: ModelLoad, original: str | None = None) -> tuple[str | None, str]:
    """(the original model directory to compare `spec` with, or None; why). `original`: an explicit one
    (--original); else the checkpoint under --globe, or the source a compressed checkpoint records (when it is
    here and holds the weights the fit saw). A plain checkpoint without an artifact has none: it is the original."""
    if original:
        if not (Path(original) / "config.json").is_file():
            raise ModelDirError(f"--original {original} is not a checkpoint directory (no config.json)")
        return str(original), "given"
    if spec.artifact is not None:
        return str(spec.model_dir), "the checkpoint the artifact is applied to"
    if not is_compressed(spec.model_dir):
        return None, "no artifact: this is the original"
    try:
        source = json.loads((Path(spec.model_dir) / CONFIG_FILE).read_text()).get("source") or {}
    except (OSError, ValueError):
        source = {}
    src = source.get("model_dir")
    if not src or not (Path(src) / "config.json").is_file():
        return None, (f"its source model {src or '(not recorded)'} is not here (pass --original DIR for KL and top-1 "
                      f"agreement)")
    fitted = source.get("content_hash")
    if fitted:
        from globe.io import open_checkpoint
        with open_checkpoint(src) as reader:
            if reader.content_hash() != fitted:
                return None, f"its source model {src} now holds other weights than those it was fitted on"
    return str(src), "the recorded source"


def add_divergence(report: dict, model, ids, spec: ModelLoad, text: EvalText, original: str) -> dict:
    """report["divergence"]: KL(original || model) and top-1 agreement on the windows the perplexity scored.
    The original is loaded only now, after the model's own memory and speed were measured."""
    device = resolve_device(spec.device)
    reference = load_model(original, dtype=compute_dtype(original, device, spec.dtype), device=str(device))
    div = divergence(reference, model, ids, max_length=text.max_length, stride=text.stride, max_tokens=text.max_tokens)
    report["divergence"] = {**div, "original": str(original)}
    log.info("KL to the original %.5f nats/token, top-1 agreement %.4f over %d tokens", div["kl"], div["top1"],
             div["tokens"])
    del reference
    return report


def evaluate_model(spec: ModelLoad, text: EvalText, original: str | None = None, compare: bool = True) -> dict:
    """evaluate() of the model described by spec, as a JSON-serialisable report; with compare, also KL and top-1
    agreement to its original (original_for(spec, original)), or report["divergence"] = None and one log line
    saying why there is none."""
    body = read_text(text.text, "--text")                              # before the (slow) model load
    calib_text = read_text(text.calib, "--calib") if text.calib else None
    reference, why = original_for(spec, original) if compare else (None, "not asked")
    model, tokenizer = load_for_eval(spec)
    if Path(text.text).resolve() == DEFAULT_TEXT.resolve() and _source_of(spec) != DEFAULT_MODEL_DIR.resolve():
        log.warning("scoring %s, the embedded model's held-out text, on %s: pass --text FILE for this model's own",
                    text.text, spec.model_dir)
    ids = encode_text(tokenizer, body)
    calib = calib_text if text.calib else ids[:text.warmup_tokens]
    report = evaluate(model, tokenizer, ids, max_length=text.max_length, stride=text.stride,
                      max_tokens=text.max_tokens, prefill_tokens=text.prefill_tokens,
                      decode_tokens=text.decode_tokens, repeats=text.repeats, calibration_text=calib,
                      hit_tokens=text.hit_tokens, skip_speed=text.no_speed)
    report["model"]["path"] = str(spec.model_dir)
    report["model"]["artifact"] = spec.artifact if not isinstance(spec.artifact, FitResult) else "(in memory)"
    ppl = report["perplexity"]["perplexity"]
    if not math.isfinite(ppl):
        log.warning("perplexity of %s is %s: the model produces non-finite logits on this text", spec.model_dir, ppl)
    report["divergence"] = None
    if reference is not None:
        add_divergence(report, model, ids, spec, text, reference)
    elif compare and (spec.artifact is not None or is_compressed(spec.model_dir)):
        log.warning("no KL or top-1 agreement for %s: %s; perplexity only", spec.model_dir, why)
    return report


def run_eval(spec: ModelLoad, text: EvalText, metrics: str | None = None, plots: str | None = None,
             sweep: str | None = None, original: str | None = None, compare: bool = True,
             overwrite: bool = False) -> dict:
    """evaluate_model (KL and top-1 agreement to `original` or the one original_for finds, unless not compare)
    with the report appended to `metrics` (JSONL; only to a metrics log), and PNG plots of the artifact into
    `plots` (replacing plots already there only with overwrite); both outputs checked before any work."""
    if metrics:
        outputs.check_log_file(metrics, "--metrics", append=True)
    if plots:
        outputs.check_output_files(plots, PLOT_FILES, overwrite, "--plots")
    outputs.check_apart({"--plots": plots, "--metrics": metrics}, nested=False)   # a log among the plots: fine
    if sweep and not plots:
        log.warning("--sweep %s is drawn only with --plots DIR: ignoring it", sweep)
    if plots:                                   # a sweep of another model is refused before the evaluation
        artifact = _plot_artifact(spec)
        sweep_doc = read_sweep(sweep) if sweep else None
        if artifact is None and sweep_doc is None:
            raise ArtifactError(f"nothing to plot: {spec.model_dir} has no artifact; pass --globe OUT or --sweep JSON")
        if sweep_doc is not None and artifact is not None and sweep_model(sweep_doc) is not None:
            check_sweep_model(sweep_doc, artifact.source, sweep)
    with tracking.session(jsonl=metrics):
        report = evaluate_model(spec, text, original=original, compare=compare)
        tracking.emit("eval", **report)
    if plots:
        report["plots"] = [str(p) for p in write_plots(plots, artifact=artifact, sweep=sweep)]
    return report


def _plot_artifact(spec: ModelLoad) -> FitResult | None:
    """The artifact `globe eval --plots` draws: --globe OUT, a compressed checkpoint's, or an artifact dir."""
    if spec.artifact is not None:
        return spec.artifact if isinstance(spec.artifact, FitResult) else load_artifact(spec.artifact)
    if is_compressed(spec.model_dir) or (Path(spec.model_dir) / BANKS_FILE).is_file():
        return load_artifact(spec.model_dir)
    return None


def run_eval_tasks(spec: ModelLoad, tasks: list[str], task_dir: str | None = None, builtin_tasks: bool = False,
                   **options) -> dict:
    """lm-evaluation-harness tasks on the model described by spec (options: see globe.eval.harness.run_tasks);
    the tasks are checked (known, local data) before the model is loaded."""
    manager = prepare_tasks(tasks, task_dir, builtin_tasks)
    model, tokenizer = load_for_eval(spec)
    report = run_tasks(model, tokenizer, tasks, manager=manager, **options)
    report["model"] = {"path": str(spec.model_dir), "artifact": spec.artifact, "mode": spec.mode}
    return report


def bench_summary(reports: dict[str, dict]) -> dict[str, dict]:
    """Per variant: perplexity (and ratio to the original), KL and top-1 agreement to the original (None for the
    original itself, or where it is not here), tokens/s, routed ratio, peak memory."""
    base = reports.get("original", {}).get("perplexity", {}).get("perplexity")
    out = {}
    for name, rep in reports.items():
        ppl = rep["perplexity"]["perplexity"]
        div = rep.get("divergence") or {}
        out[name] = {"perplexity": ppl, "perplexity_ratio": ppl / base if base else None,
                     "kl": div.get("kl"), "top1": div.get("top1"),
                     "prefill_tok_s": rep.get("speed", {}).get("prefill_tok_s"),
                     "decode_tok_s": rep.get("speed", {}).get("decode_tok_s"),
                     "cache_hit_rate": (rep.get("cache") or {}).get("hit_rate"),
                     "routed_ratio": rep["footprint"]["routed_ratio"], "total_ratio": rep["footprint"]["total_ratio"],
                     "model_bytes": rep["footprint"].get("model_bytes"),
                     "runtime_ratio": rep["footprint"].get("runtime_ratio"),
                     "peak_rss_mb": rep["memory"]["peak_rss_mb"], "cuda_peak_mb": rep["memory"].get("cuda_peak_mb")}
    return out


def bench_variants(spec: ModelLoad, modes: list[str], original: bool = True) -> dict[str, ModelLoad]:
    """{variant name: ModelLoad}: "original" and one per runtime mode."""
    variants: dict[str, ModelLoad] = {}
    if is_compressed(spec.model_dir):
        result = load_artifact(spec.model_dir, force=spec.force)
        source = result.source.get("model_dir")
        if original and source and Path(source).is_dir():
            check_same_weights(result, source, force=spec.force)     # the source the checkpoint was made from
            variants["original"] = dataclasses.replace(spec, model_dir=source, artifact=None, tokenizer=spec.tokenizer
                                                       or spec.model_dir)
        elif original:
            log.warning("bench: the source model %s of %s is not here: no original to compare", source,
                        spec.model_dir)
        variants.update({mode: dataclasses.replace(spec, mode=mode) for mode in modes})
    else:
        if original:
            variants["original"] = dataclasses.replace(spec, artifact=None)
        if spec.artifact:
            variants.update({mode: dataclasses.replace(spec, mode=mode) for mode in modes})
    if not variants:
        raise ArtifactError("nothing to benchmark: pass --globe OUT (or a compressed checkpoint) or drop --no-original")
    return variants


def evaluate_isolated(spec: ModelLoad, text: EvalText, original: str | None = None, compare: bool = True) -> dict:
    """evaluate_model in a fresh Python process (a FitResult artifact, which cannot travel, runs in this one)."""
    import subprocess
    import sys
    if spec.artifact is not None and not isinstance(spec.artifact, (str, Path)):
        return evaluate_model(spec, text, original, compare)
    job = json.dumps({"spec": {**dataclasses.asdict(spec), "artifact": str(spec.artifact) if spec.artifact else None},
                      "text": dataclasses.asdict(text), "original": original, "compare": compare})
    proc = subprocess.run([sys.executable, "-m", "globe.run.evaluate"], input=job, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GlobeError(f"evaluating {spec.model_dir} ({spec.mode}) in its own process failed: {last}")
    return json.loads(lines[-1])


def _worker() -> None:
    """`python -m globe.run.evaluate`: one evaluate_model job from stdin, its report as the last stdout line."""
    import sys
    job = json.loads(sys.stdin.read())
    report = evaluate_model(ModelLoad(**job["spec"]), EvalText(**job["text"]), job.get("original"),
                            job.get("compare", True))
    sys.stdout.write(json.dumps(report, default=float) + "\n")


def run_bench(spec: ModelLoad, modes: list[str], text: EvalText, original: bool = True,
              metrics: str | None = None, out: str | None = None, isolate: bool = True,
              overwrite: bool = False) -> dict:
    """The original model (unless original=False) and spec.artifact in each of `modes`, on the same text:
    {"model_dir", "artifact", "summary", "reports"}, also written to `out` (JSON) when given (an existing file
    only with overwrite). spec.model_dir may be a compressed checkpoint: its modes are measured, against the
    source model it records when that exists. Each variant runs in its own process (isolate), so that memory and
    speed do not carry over between them."""
    inputs = [spec.model_dir, spec.artifact if isinstance(spec.artifact, (str, Path)) else None, text.text,
              text.calib, spec.tokenizer]
    if metrics:
        outputs.check_not_an_input(metrics, inputs, flag="--metrics")
        outputs.check_log_file(metrics, "--metrics", append=True)
    outputs.check_apart({"-o": out, "--metrics": metrics})
    claim = outputs.claim_output_file(out, "bench", overwrite, inputs=inputs) if out else contextlib.nullcontext()
    with claim:
        return _bench(spec, modes, text, original, metrics, out, isolate)


def _bench(spec: ModelLoad, modes: list[str], text: EvalText, original: bool, metrics: str | None,
           out: str | None, isolate: bool) -> dict:
    reports = {}
    with tracking.session(jsonl=metrics):
        for name, variant in bench_variants(spec, modes, original).items():
            log.info("bench: %s", name)
            reports[name] = evaluate_isolated(variant, text) if isolate else evaluate_model(variant, text)
            tracking.emit("bench", variant=name, **reports[name])
    doc = {"model_dir": str(spec.model_dir), "artifact": spec.artifact, "summary": bench_summary(reports),
           "reports": reports}
    if out:
        atomic_write_text(Path(out), outputs.json_text(doc, indent=1))
    return doc


if __name__ == "__main__":
    _worker()
