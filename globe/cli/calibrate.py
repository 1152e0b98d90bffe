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
from globe.calibration.stats import save_stats
from globe.errors import ConfigError, ModelDirError

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
    a("--overwrite", action="store_true", help="replace an existing STATS file")
    a("--max-tokens", type=int, default=32768, help="calibration tokens read from the start of --text (default 32768)")
    a("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    a("--layer-only", action="store_true",
      help="only the per-layer statistics (smaller; no per-expert C, no activation-aware down projections)")
    a("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    a("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="device (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from globe import outputs
    from globe.io.text import read_text
    text_path, out = Path(args.text), Path(args.out)
    if args.window < 1 or args.max_tokens < 0:
        raise ConfigError(f"--window must be >= 1 and --max-tokens >= 0 (got --window {args.window}, "
                          f"--max-tokens {args.max_tokens})")
    with outputs.claim_output_file(out, "calibrate", args.overwrite, inputs=[args.model_dir, text_path, args.tokenizer]):
        text = read_text(text_path, "--text", 64 * args.max_tokens or None)   # ~4 characters per token: plenty
        stats = _collect(args, text, text_path)
        save_stats(stats, out)
    print(f"activation statistics of {len(stats.layers)} MoE layers over {stats.tokens:,} tokens written to {out}")
    return 0


def _collect(args: argparse.Namespace, text: str, text_path: Path):
    import transformers
    from globe.calibration import collect_stats
    from globe.eval import encode_text
    from globe.export import load_model
    from globe.fit.engine import resolve_device
    model = load_model(args.model_dir, device=str(resolve_device(args.device)))
    source = args.tokenizer or args.model_dir
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as exc:              # any failure of a user's tokenizer files ends in the same advice
        raise ModelDirError(f"no usable tokenizer in {source} ({type(exc).__name__}); pass --tokenizer DIR") from None
    ids = encode_text(tokenizer, text)[:args.max_tokens] if args.max_tokens else encode_text(tokenizer, text)
    if ids.numel() < 2:
        raise ConfigError(f"--text file {text_path} gives {ids.numel()} token(s); calibration needs at least 2, "
                          f"pass a longer text")
    return collect_stats(model, ids, window=args.window, per_expert=not args.layer_only,
                         info={"model_dir": str(Path(args.model_dir).resolve()), "text": str(text_path.resolve())})
