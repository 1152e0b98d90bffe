"""`globe bench [MODEL_DIR] [--globe OUT] [--modes M ...] [-o JSON]`: the original model against each GloBE runtime.

Evaluates the original checkpoint and, with --globe, the model patched in every requested mode (same text,
windows and timings as `globe eval`), and writes one JSON: the full reports plus a summary table of perplexity,
its ratio to the original, prefill/decode tokens/s, routed-parameter ratio and peak memory per variant.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from globe.artifact import atomic_write_text
from globe.assets import DEFAULT_MODEL_DIR
from globe.cli.eval import add_eval_options, check_eval_options, evaluate_args
from globe.errors import ArtifactError
from globe.run_config import RUNTIME_MODES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the original model against GloBE runtime modes, write JSON",
                       description="Quality and speed benchmark: perplexity, prefill/decode tokens/s, memory and "
                                   "cache hit rate of the original model and of the model patched with --globe in "
                                   "each of --modes. Prints a table; -o also writes every report as JSON.")
    p.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
                   help="HF checkpoint directory (default: the embedded model)")
    p.add_argument("--globe", metavar="OUT", help="artifact directory from `globe fit` (without it: original only)")
    p.add_argument("--modes", nargs="+", default=list(RUNTIME_MODES), choices=RUNTIME_MODES,
                   help="GloBE runtime modes to benchmark (default: all)")
    p.add_argument("--no-original", action="store_true", help="skip the original model")
    p.add_argument("-o", "--out", metavar="JSON", help="write the benchmark JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    add_eval_options(p)
    p.set_defaults(func=run)


def summarize(reports: dict[str, dict]) -> dict[str, dict]:
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


def run(args: argparse.Namespace) -> int:
    from globe import outputs
    check_eval_options(args)
    with outputs.claim_output_file(args.out, "bench", args.overwrite) if args.out else contextlib.nullcontext():
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    from globe import outputs, tracking
    variants = ([] if args.no_original else [("original", None)]) + \
        [(mode, args.globe) for mode in (args.modes if args.globe else [])]
    if not variants:
        raise ArtifactError("nothing to benchmark: pass --globe OUT or drop --no-original")
    reports = {}
    with tracking.session(jsonl=args.metrics):
        for name, artifact in variants:
            log.info("bench: %s", name)
            reports[name] = evaluate_args(args, mode=name if artifact else None, artifact=artifact or "")
            tracking.emit("bench", variant=name, **reports[name])
    doc = {"model_dir": str(args.model_dir), "artifact": args.globe, "summary": summarize(reports), "reports": reports}
    if args.out:
        atomic_write_text(Path(args.out), outputs.json_text(doc, indent=1))
    print(format_summary(doc["summary"]) + (f"\nbenchmark written to {args.out}" if args.out else ""))
    return 0


def format_summary(summary: dict[str, dict]) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-".rjust(int(fmt.split(".")[0]))
    lines = [f"{'variant':10} {'ppl':>9} {'ratio':>7} {'prefill/s':>10} {'decode/s':>9} {'hits':>6} {'routed':>7}"]
    for name, row in summary.items():
        lines.append(f"{name:10} {row['perplexity']:9.3f} {num(row['perplexity_ratio'], '7.4f')} "
                     f"{num(row['prefill_tok_s'], '10.1f')} {num(row['decode_tok_s'], '9.1f')} "
                     f"{num(row['cache_hit_rate'], '6.3f')} {row['routed_ratio']:7.3f}")
    return "\n".join(lines)
