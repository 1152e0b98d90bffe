"""`globe calibrate [MODEL_DIR] --text FILE -o STATS [--max-tokens N]`: activation statistics for activation-aware fits.

Runs the calibration text through the original model and writes the second moments of the routed experts' inputs
(per MoE layer, and per expert over the tokens routed to it, for gate/up and for down) to one safetensors file,
which `globe fit --calibration STATS` uses. Calibrate on text of the model's domain that is NOT the evaluation text.
"""
from __future__ import annotations

import argparse
import logging

from globe.assets import DEFAULT_MODEL_DIR
from globe.device import DEVICES
from globe.run.calibrate import CalibrateRun, run_calibrate

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="collect activation statistics of the routed experts on calibration text",
                       description="Run calibration text through the model and write the input second moments "
                                   "X^T X of every MoE layer's routed experts (all tokens, and per expert over its "
                                   "routed tokens; down-projection inputs per expert) plus routing counts, for "
                                   "`globe fit --calibration STATS`.")
    a = p.add_argument
    a("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
      help="checkpoint directory (default: the embedded model)")
    a("--text", required=True, metavar="FILE", help="calibration text (not the text you evaluate on)")
    a("-o", "--out", required=True, metavar="STATS", help="output statistics file (.safetensors)")
    a("--overwrite", action="store_true", help="replace an existing STATS file")
    a("--max-tokens", type=int, default=32768, help="calibration tokens read from the start of --text (default 32768)")
    a("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    a("--layer-only", action="store_true",
      help="only the per-layer statistics (smaller; no per-expert C, no activation-aware down projections)")
    a("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    a("--device", default="auto", choices=DEVICES, help="device; auto = cuda, else mps, else cpu (default auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stats = run_calibrate(CalibrateRun(model_dir=args.model_dir, text=args.text, out=args.out,
                                       max_tokens=args.max_tokens, window=args.window, layer_only=args.layer_only,
                                       tokenizer=args.tokenizer, device=args.device, overwrite=args.overwrite))
    print(f"activation statistics of {len(stats.layers)} MoE layers over {stats.tokens:,} tokens written to {args.out}")
    return 0
