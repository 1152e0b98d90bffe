"""`globe eval [MODEL_DIR_OR_HF_DIR] [--globe OUT] [--mode M] [--text FILE] [--original DIR] [--json]`: perplexity,
KL(original || compressed) per token and top-1 agreement to the original where it is known, speed, memory;
with `--tasks t1,t2 [--task-dir DIR]`: zero-shot tasks through lm-evaluation-harness instead (globe.eval.harness).

MODEL_DIR_OR_HF_DIR is an ordinary Hugging Face checkpoint (original or a `globe export --dense` one), optionally
patched with the artifact OUT, or a compressed checkpoint from `globe export` (its artifact is inside). The
default model is the embedded one and the default text its held-out split. Cached layers are warmed up from
routing counts on --calib (default: the first --warmup-tokens tokens of the text; outputs do not depend on it),
and the hit rate is counted while decoding the last --hit-tokens tokens one by one. The original a compressed
model is compared with is MODEL_DIR under --globe, the source a compressed checkpoint records, or --original.
The runs themselves are
globe.run.evaluate's; the options shared with `globe bench` are in globe.cli.eval_options.
"""
from __future__ import annotations

import argparse
import logging

from globe.assets import DEFAULT_MODEL_DIR
from globe.cli.eval_options import add_eval_options, eval_text, model_load
from globe.core.outputs import json_text
from globe.eval.harness import BOOTSTRAP_ITERS, metric_lines
from globe.run.config import CacheConfig
from globe.run.evaluate import run_eval, run_eval_tasks
from globe.runtime import MODES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement to the original, tokens/s, memory and "
                                    "cache hit rate of a (compressed) model",
                       description="Evaluate a model, optionally patched with a GloBE artifact: sliding-window "
                                   "perplexity, KL(original || compressed) per token and top-1 agreement on the same "
                                   "windows (where the original is known), prefill and "
                                   "greedy-decode tokens/s, memory, cache hit rate and the "
                                   "routed-expert parameter counts before/after. --plots DIR also writes PNG plots "
                                   "of the artifact (error vs budget, per-layer error, supports, atoms, AM history).")
    a = p.add_argument
    a("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
      help="HF checkpoint or compressed checkpoint directory (default: the embedded model)")
    a("--globe", metavar="OUT", help="artifact directory to apply to the model (from `globe fit`)")
    a("--mode", default=CacheConfig.mode, choices=MODES,
      help=f"GloBE runtime mode (default {CacheConfig.mode})")
    add_eval_options(p)
    a("--original", metavar="DIR",
      help="the uncompressed model to measure KL and top-1 agreement against (default: MODEL_DIR under --globe, "
           "or the source a compressed checkpoint records, when it is here)")
    a("--no-kl", action="store_true", help="skip KL and top-1 agreement to the original (it is not loaded)")
    a("--plots", metavar="DIR", help="write PNG plots of the artifact (and of --sweep) into DIR")
    a("--sweep", metavar="JSON", help="budget sweep of this checkpoint for error_vs_budget.png (from `globe sweep`)")
    a("--json", action="store_true", help="print the full report as JSON")
    a("--overwrite", action="store_true", help="replace plots already in --plots DIR")
    h = p.add_argument_group("zero-shot tasks (lm-evaluation-harness; pip install 'globe-moe[eval]')")
    h.add_argument("--tasks", metavar="T1,T2", help="run these lm-eval tasks instead of perplexity and speed")
    h.add_argument("--task-dir", metavar="DIR", help="directory of local lm-eval task YAMLs (only it is indexed)")
    h.add_argument("--builtin-tasks", action="store_true", help="also index lm-eval's built-in tasks with --task-dir")
    h.add_argument("--limit", type=int, help="examples per task (default: all)")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's, usually 0)")
    h.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    h.add_argument("--bootstrap-iters", type=int, default=BOOTSTRAP_ITERS, metavar="N",
                   help=f"lm-eval resamples for the stderr of metrics without a closed form (default "
                        f"{BOOTSTRAP_ITERS}; acc's is closed-form; 0: no stderrs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tasks:                                   # zero-shot tasks through lm-evaluation-harness
        return print_tasks(args)
    report = run_eval(model_load(args), eval_text(args), metrics=args.metrics, plots=args.plots, sweep=args.sweep,
                      original=args.original, compare=not args.no_kl, overwrite=args.overwrite)
    print(json_text(report, indent=2) if args.json else format_report(report))
    return 0


def print_tasks(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = run_eval_tasks(model_load(args), tasks, task_dir=args.task_dir, builtin_tasks=args.builtin_tasks,
                            batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                            bootstrap_iters=args.bootstrap_iters)
    if args.json:
        print(json_text(report, indent=2, default=str))
        return 0
    for task, metrics in report["results"].items():
        shown = ", ".join(metric_lines(metrics))
        print(f"{task:24} {shown} ({report['n_samples'].get(task, {}).get('effective', '?')} examples)")
    return 0


def format_report(report: dict) -> str:
    """Human-readable summary of an evaluate() report."""
    m, ppl, fp = report["model"], report["perplexity"], report["footprint"]
    lines = [f"model        {m['path']} ({m['model_type']}, {m['dtype']}, {m['device']}, "
             f"GloBE mode {m['globe_mode'] or 'none'})",
             f"perplexity   {ppl['perplexity']:.4f} over {ppl['tokens']:,} tokens "
             f"(window {ppl['max_length']}, stride {ppl['stride']})"]
    div = report.get("divergence")
    if div:
        lines.append(f"vs original  KL {div['kl']:.5f} nats/token, top-1 agreement {div['top1']:.4f} over "
                     f"{div['tokens']:,} tokens (original perplexity {div['reference_perplexity']:.4f}; "
                     f"{div['original']})")
    if "speed" in report:
        s = report["speed"]
        lines += [f"prefill      {s['prefill_tok_s']:,.1f} tok/s ({s['prefill_tokens']} tokens)",
                  f"decode       {s['decode_tok_s']:,.1f} tok/s ({s['decode_new_tokens']} new tokens, greedy)"]
    if report.get("cache"):
        c = report["cache"]
        lines.append(f"cache        decode hit rate {c['hit_rate']:.3f} ({c['hits']:,} hits, {c['misses']:,} misses "
                     f"over {c['tokens']} tokens)")
    ckpt = fp.get("checkpoint") or {}
    floats = "; floats only: the packed integer codes count in bytes" if ckpt.get("packed_bytes") else ""
    lines += [f"routed       {fp['routed_params_before']:,} -> {fp['routed_params_after']:,} params "
              f"({100 * fp['routed_ratio']:.1f} %{floats}), {fp['routed_bytes_before']:,} -> "
              f"{fp['routed_bytes_after']:,} bytes held"]
    if ckpt:
        before = f"{ckpt['routed_bytes_before']:,} -> " if ckpt["routed_bytes_before"] else ""
        ratio = f" ({100 * ckpt['routed_ratio']:.1f} %)" if ckpt["routed_ratio"] else ""
        packed = (f", {ckpt['packed_bytes']:,} of them packed quantized factors (integer codes + fp16 scales and "
                  f"zeros)") if ckpt["packed_bytes"] else ""
        lines.append(f"stored       {before}{ckpt['routed_bytes_after']:,} bytes of routed experts in the checkpoint"
                     f"{ratio}{packed}")
    lines += [f"total        {fp['total_params_before']:,} -> {fp['total_params_after']:,} params "
              f"({100 * fp['total_ratio']:.1f} %)"]
    if "model_bytes" in fp:
        lines.append(f"held         {fp['original_bytes']:,} -> {fp['model_bytes']:,} bytes of parameters, buffers and "
                     f"cache ({100 * fp['runtime_ratio']:.1f} % of the original; stored "
                     f"{100 * fp['stored_bytes_ratio']:.1f} %)")
    mem = report["memory"]
    cuda = f", CUDA peak {mem['cuda_peak_mb']:.0f} MiB" if mem.get("cuda_peak_mb") is not None else ""
    cuda += f", MPS {mem['mps_mb']:.0f} MiB" if mem.get("mps_mb") is not None else ""
    lines.append(f"memory       RSS {mem['rss_mb']:.0f} MiB (peak {mem['peak_rss_mb']:.0f} MiB){cuda}")
    if mem.get("breakdown"):
        b = mem["breakdown"]
        lines.append(f"             weights {b['weights_mb']:.1f} MiB + caches {b['caches_mb']:.1f} MiB + framework "
                     f"{b['framework_mb']:.0f} MiB (Python, torch, transformers, tokenizer)")
        if b.get("packed_mb"):
            lines.append(f"             of the weights, {b['packed_mb']:.2f} MiB packed quantized factors; the caches "
                         f"hold them dequantized")
    lines += [f"plot         {path}" for path in report.get("plots", [])]
    return "\n".join(lines)
