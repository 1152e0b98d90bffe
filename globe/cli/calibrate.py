"""`globe calibrate [MODEL_DIR] --text FILE -o STATS [--max-tokens N]`: activation statistics for activation-aware fits.

Runs the calibration text through the original model and writes the second moments of the routed experts' inputs
(per MoE layer, and per expert over the tokens routed to it, for gate/up and for down) to one safetensors file,
which `globe fit --calibration STATS` uses. Calibrate on text of the model's domain that is NOT the evaluation text.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from globe.assets import DEFAULT_MODEL_DIR
from globe.errors import ModelDirError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="collect activation statistics of the routed experts on calibration text",
                       description="Run calibration text through the model and write the input second moments "
                                   "X^T X of every MoE layer's routed experts (all tokens, and per expert over its "
                                   "routed tokens; down-projection inputs per expert) plus routing counts, for "
                                   "`globe fit --calibration STATS`.")
    a = p.add_argument
    a("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the embedded model)")
    a("--text", required=True, metavar="FILE", help="calibration text (not the text you evaluate on)")
    a("-o", "--out", required=True, metavar="STATS", help="output statistics file (.safetensors)")
    a("--max-tokens", type=int, default=32768, help="calibration tokens read from the start of --text (default 32768)")
    a("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    a("--layer-only", action="store_true",
      help="only the per-layer statistics (smaller; no per-expert C, no activation-aware down projections)")
    a("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    a("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="device (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers
    from globe.calibration import collect_stats, save_stats
    from globe.eval import encode_text
    from globe.export import load_model
    from globe.device import resolve_device
    text_path = Path(args.text)
    if not text_path.is_file():
        raise ModelDirError(f"--text file {text_path} not found; pass an existing text file")
    source = args.tokenizer or args.model_dir
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"no usable tokenizer in {source} ({type(exc).__name__}); pass --tokenizer DIR") from None
    model = load_model(args.model_dir, device=str(resolve_device(args.device)))
    with text_path.open(encoding="utf-8") as fh:                          # ~4 characters per token is plenty
        text = fh.read(64 * args.max_tokens) if args.max_tokens else fh.read()
    ids = encode_text(tokenizer, text)[:args.max_tokens] if args.max_tokens else encode_text(tokenizer, text)
    stats = collect_stats(model, ids, window=args.window, per_expert=not args.layer_only,
                          info={"model_dir": str(Path(args.model_dir).resolve()), "text": str(text_path.resolve())})
    save_stats(stats, args.out)
    print(f"activation statistics of {len(stats.layers)} MoE layers over {stats.tokens:,} tokens written to {args.out}")
    return 0
