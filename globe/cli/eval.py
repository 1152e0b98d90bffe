"""`globe eval [MODEL_DIR_OR_HF_DIR] [--globe OUT] [--mode M] [--text FILE] [--json]`: perplexity, speed, memory;
with `--tasks t1,t2 [--task-dir DIR]`: zero-shot tasks through lm-evaluation-harness instead (globe.eval.harness).

MODEL_DIR_OR_HF_DIR is an ordinary Hugging Face checkpoint (original or a `globe export --dense` one), optionally
patched with the artifact OUT, or a compressed checkpoint from `globe export` (its artifact is inside). The
default model is the embedded one and the default text its held-out split. Cached layers are warmed up from
routing counts on --calib (default: the first --warmup-tokens tokens of the text; outputs do not depend on it),
and the hit rate is counted while decoding the last --hit-tokens tokens one by one.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from globe.assets import DEFAULT_MODEL_DIR
from globe.device import DEVICES
from globe.errors import ArtifactError, ConfigError, ModelDirError
from globe.io.text import read_text
from globe.outputs import json_text
from globe.run_config import RUNTIME_MODES, CacheConfig

log = logging.getLogger(__name__)
DEFAULT_TEXT = DEFAULT_MODEL_DIR / "heldout.txt"


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `globe eval` and `globe bench`: text, windows, timings, device and dtype."""
    a = p.add_argument
    a("--cache-size", type=int, help="experts per layer kept precomposed in cached mode (default: half)")
    a("--text", default=str(DEFAULT_TEXT), metavar="FILE", help="held-out text (default: the embedded model's)")
    a("--calib", metavar="FILE", help="calibration text for the cache warm-up (default: start of --text)")
    a("--warmup-tokens", type=int, default=CacheConfig.warmup_tokens,
      help=f"tokens of --text used for warm-up without --calib (default {CacheConfig.warmup_tokens})")
    a("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    a("--max-length", type=int, default=256, help="perplexity window in tokens (default 256)")
    a("--stride", type=int, help="perplexity window step (default: --max-length, no overlap)")
    a("--max-tokens", type=int, help="score only the first N tokens of the text (default: all)")
    a("--prefill-tokens", type=int, default=256, help="prompt length of the prefill timing (default 256)")
    a("--decode-tokens", type=int, default=32, help="new tokens of the greedy decode timing (default 32)")
    a("--repeats", type=int, default=3, help="timed repetitions, the median is reported (default 3)")
    a("--hit-tokens", type=int, default=256, help="last tokens of the text decoded one by one to count cache hits")
    a("--no-speed", action="store_true", help="skip the prefill/decode timings")
    a("--device", default="cpu", choices=DEVICES, help="device; auto = cuda, else mps, else cpu (default cpu)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="compute dtype (default auto: the checkpoint's dtype, float32 where the device lacks it)")
    a("--metrics", metavar="FILE", help="append the results to this JSONL metrics file")
    a("--force", action="store_true",
      help="apply --globe even if the model's weights differ from those it was fitted on (same shapes; warns)")


# Options that count something: (flag, attribute, smallest allowed value).
_COUNTS = [("--max-length", "max_length", 2), ("--stride", "stride", 1), ("--max-tokens", "max_tokens", 0),
           ("--prefill-tokens", "prefill_tokens", 1), ("--decode-tokens", "decode_tokens", 1),
           ("--repeats", "repeats", 1), ("--hit-tokens", "hit_tokens", 0), ("--warmup-tokens", "warmup_tokens", 0),
           ("--cache-size", "cache_size", 1)]


def check_eval_options(args: argparse.Namespace) -> None:
    """ConfigError naming the option when a count is out of range, or an output would land in an input."""
    from globe import outputs
    for flag, attr, low in _COUNTS:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low} (got {value})")
    stride, length = getattr(args, "stride", None), args.max_length
    if stride is not None and stride > length:
        raise ConfigError(f"--stride ({stride}) must be <= --max-length ({length})")
    inputs = [args.model_dir, getattr(args, "globe", None), args.text, args.calib, args.tokenizer]
    for flag, attr in (("--metrics", "metrics"), ("--plots", "plots"), ("-o", "out")):
        if getattr(args, attr, None):
            outputs.check_not_an_input(getattr(args, attr), inputs, flag=flag)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, tokens/s, memory and cache hit rate of a (compressed) model",
                       description="Evaluate a model, optionally patched with a GloBE artifact: sliding-window "
                                   "perplexity, prefill and greedy-decode tokens/s, memory, cache hit rate and the "
                                   "routed-expert parameter counts before/after. --plots DIR also writes PNG plots "
                                   "of the artifact (error vs budget, per-layer error, supports, atoms, AM history).")
    a = p.add_argument
    a("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR_OR_HF_DIR",
      help="HF checkpoint or compressed checkpoint directory (default: the embedded model)")
    a("--globe", metavar="OUT", help="artifact directory to apply to the model (from `globe fit`)")
    a("--mode", default=CacheConfig.mode, choices=RUNTIME_MODES,
      help=f"GloBE runtime mode (default {CacheConfig.mode})")
    add_eval_options(p)
    a("--plots", metavar="DIR", help="write PNG plots of the artifact (and of --sweep) into DIR")
    a("--sweep", metavar="JSON", help="budget sweep for the error-vs-budget plot (benchmarks/quality.py output)")
    a("--json", action="store_true", help="print the full report as JSON")
    h = p.add_argument_group("zero-shot tasks (lm-evaluation-harness; pip install 'globe-moe[eval]')")
    h.add_argument("--tasks", metavar="T1,T2", help="run these lm-eval tasks instead of perplexity and speed")
    h.add_argument("--task-dir", metavar="DIR", help="directory of local lm-eval task YAMLs (only it is indexed)")
    h.add_argument("--builtin-tasks", action="store_true", help="also index lm-eval's built-in tasks with --task-dir")
    h.add_argument("--limit", type=int, help="examples per task (default: all)")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's, usually 0)")
    h.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    p.set_defaults(func=run)


def load_for_eval(args: argparse.Namespace, mode: str | None = None, artifact: str | None = None):
    """(model, tokenizer) as requested: compressed checkpoint, or HF checkpoint with an optional artifact."""
    import transformers
    from globe.device import compute_dtype, resolve_device
    from globe.export import is_compressed, load_compressed, load_model
    from globe.runtime import apply_globe
    device, mode = resolve_device(args.device), mode or getattr(args, "mode", CacheConfig.mode)
    artifact = artifact if artifact is not None else getattr(args, "globe", None)
    if is_compressed(args.model_dir):
        if artifact:
            raise ArtifactError(f"{args.model_dir} is a compressed checkpoint and holds its artifact; drop --globe")
        model = load_compressed(args.model_dir, mode=mode, cache_size=args.cache_size, device=device)
    else:
        loaded = None
        if artifact:
            from globe.artifact import check_compatible, load
            loaded = load(artifact) if isinstance(artifact, (str, Path)) else artifact
            check_compatible(loaded, args.model_dir, force=getattr(args, "force", False))   # before the model load
        model = load_model(args.model_dir, dtype=compute_dtype(args.model_dir, device, args.dtype), device=str(device))
        if loaded is not None:
            apply_globe(model, loaded, mode=mode, cache_size=args.cache_size)
    source = args.tokenizer or args.model_dir
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as exc:              # any failure of a user's tokenizer files ends in the same advice
        raise ModelDirError(f"no usable tokenizer in {source} ({type(exc).__name__}); pass --tokenizer DIR") from None
    return model, tokenizer


def evaluate_args(args: argparse.Namespace, mode: str | None = None, artifact: str | None = None) -> dict:
    """evaluate() of the model described by args (see load_for_eval), as a JSON-serialisable report."""
    from globe.eval import encode_text, evaluate
    text = read_text(args.text, "--text")                              # before the (slow) model load
    calib_text = read_text(args.calib, "--calib") if args.calib else None
    model, tokenizer = load_for_eval(args, mode, artifact)
    calib = calib_text if args.calib else encode_text(tokenizer, text)[:args.warmup_tokens]
    report = evaluate(model, tokenizer, text, max_length=args.max_length, stride=args.stride,
                      max_tokens=args.max_tokens, prefill_tokens=args.prefill_tokens,
                      decode_tokens=args.decode_tokens, repeats=args.repeats, calibration_text=calib,
                      hit_tokens=args.hit_tokens, skip_speed=args.no_speed)
    report["model"]["path"] = str(args.model_dir)
    report["model"]["artifact"] = artifact if artifact is not None else getattr(args, "globe", None)
    return report


def run(args: argparse.Namespace) -> int:
    check_eval_options(args)
    if args.tasks:                                   # zero-shot tasks through lm-evaluation-harness
        model, tokenizer = load_for_eval(args)
        return run_harness(model, tokenizer, args)
    from globe import tracking
    with tracking.session(jsonl=args.metrics):
        report = evaluate_args(args)
        tracking.emit("eval", **report)
    if args.plots:
        from globe.eval.plots import write_plots
        artifact = args.globe or (args.model_dir if (Path(args.model_dir) / "banks.safetensors").is_file() else None)
        report["plots"] = [str(p) for p in write_plots(args.plots, artifact=artifact, sweep=args.sweep)]
    ppl = report["perplexity"]["perplexity"]
    if not math.isfinite(ppl):
        log.warning("perplexity is %s: the model produces non-finite logits on this text", ppl)
    print(json_text(report, indent=2) if args.json else format_report(report))
    return 0


def run_harness(model, tokenizer, args: argparse.Namespace) -> int:
    from globe.eval.harness import run_tasks
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = run_tasks(model, tokenizer, tasks, task_dir=args.task_dir, builtin_tasks=args.builtin_tasks,
                       batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot)
    report["model"] = {"path": str(args.model_dir), "artifact": args.globe, "mode": args.mode}
    if args.json:
        print(json_text(report, indent=2, default=str))
        return 0
    for task, metrics in report["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task:24} {shown} ({report['n_samples'].get(task, {}).get('effective', '?')} examples)")
    return 0


def format_report(report: dict) -> str:
    """Human-readable summary of an evaluate() report."""
    m, ppl, fp = report["model"], report["perplexity"], report["footprint"]
    lines = [f"model        {m['path']} ({m['model_type']}, {m['dtype']}, {m['device']}, "
             f"GloBE mode {m['globe_mode'] or 'none'})",
             f"perplexity   {ppl['perplexity']:.4f} over {ppl['tokens']:,} tokens "
             f"(window {ppl['max_length']}, stride {ppl['stride']})"]
    if "speed" in report:
        s = report["speed"]
        lines += [f"prefill      {s['prefill_tok_s']:,.1f} tok/s ({s['prefill_tokens']} tokens)",
                  f"decode       {s['decode_tok_s']:,.1f} tok/s ({s['decode_new_tokens']} new tokens, greedy)"]
    if report.get("cache"):
        c = report["cache"]
        lines.append(f"cache        decode hit rate {c['hit_rate']:.3f} ({c['hits']:,} hits, {c['misses']:,} misses "
                     f"over {c['tokens']} tokens)")
    lines += [f"routed       {fp['routed_params_before']:,} -> {fp['routed_params_after']:,} params "
              f"({100 * fp['routed_ratio']:.1f} %), {fp['routed_bytes_before']:,} -> {fp['routed_bytes_after']:,} bytes",
              f"total        {fp['total_params_before']:,} -> {fp['total_params_after']:,} params "
              f"({100 * fp['total_ratio']:.1f} %)"]
    mem = report["memory"]
    cuda = f", CUDA peak {mem['cuda_peak_mb']:.0f} MiB" if mem.get("cuda_peak_mb") is not None else ""
    cuda += f", MPS {mem['mps_mb']:.0f} MiB" if mem.get("mps_mb") is not None else ""
    lines.append(f"memory       RSS {mem['rss_mb']:.0f} MiB (peak {mem['peak_rss_mb']:.0f} MiB){cuda}")
    lines += [f"plot         {path}" for path in report.get("plots", [])]
    return "\n".join(lines)
