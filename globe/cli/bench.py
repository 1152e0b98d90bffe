"""`globe bench [MODEL_DIR] [--globe OUT] [--modes M ...] [-o JSON]`: the original model against each GloBE runtime.

Evaluates the original checkpoint and, with --globe, the model patched in every requested mode (same text,
windows and timings as `globe eval`), and writes one JSON: the full reports plus a summary table of perplexity,
its ratio to the original, prefill/decode tokens/s, routed-parameter ratio and peak memory per variant
(the run is globe.run.evaluate.run_bench).
"""
from __future__ import annotations

import argparse
import logging

from globe.assets import DEFAULT_MODEL_DIR
from globe.cli.eval_options import add_eval_options, eval_text, model_load
from globe.run.evaluate import run_bench
from globe.runtime import MODES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the original model against GloBE runtime modes, write JSON",
                       description="Quality and speed benchmark: perplexity, prefill/decode tokens/s, memory and "
                                   "cache hit rate of the original model and of the model patched with --globe in "
                                   "each of --modes. Prints a table; -o also writes every report as JSON.")
    p.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
                   help="HF checkpoint directory (default: the embedded model)")
    p.add_argument("--globe", metavar="OUT", help="artifact directory from `globe fit` (without it: original only)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="GloBE runtime modes to benchmark (default: all)")
    p.add_argument("--no-original", action="store_true", help="skip the original model")
    p.add_argument("-o", "--out", metavar="JSON", help="write the benchmark JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    add_eval_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    doc = run_bench(model_load(args), args.modes, eval_text(args), original=not args.no_original,
                    metrics=args.metrics, out=args.out, overwrite=args.overwrite)
    print(format_summary(doc["summary"]) + (f"\nbenchmark written to {args.out}" if args.out else ""))
    return 0


def format_summary(summary: dict[str, dict]) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-".rjust(int(fmt.split(".")[0]))
    lines = [f"{'variant':10} {'ppl':>9} {'ratio':>7} {'prefill/s':>10} {'decode/s':>9} {'hits':>6} {'routed':>7} "
             f"{'held MB':>8} {'/orig':>6} {'peak MiB':>8}"]
    for name, row in summary.items():
        held = row["model_bytes"] / 1e6 if row.get("model_bytes") is not None else None
        lines.append(f"{name:10} {row['perplexity']:9.3f} {num(row['perplexity_ratio'], '7.4f')} "
                     f"{num(row['prefill_tok_s'], '10.1f')} {num(row['decode_tok_s'], '9.1f')} "
                     f"{num(row['cache_hit_rate'], '6.3f')} {row['routed_ratio']:7.3f} {num(held, '8.2f')} "
                     f"{num(row.get('runtime_ratio'), '6.3f')} {num(row.get('peak_rss_mb'), '8.0f')}")
    return "\n".join(lines)
