"""Options shared by `globe eval` and `globe bench` (text, windows, timings, device, dtype), and their
translation into the run layer's configs (globe.run.load.ModelLoad, globe.run.evaluate.EvalText)."""
from __future__ import annotations

import argparse

from globe.core import outputs
from globe.device import DEVICES
from globe.errors import ConfigError
from globe.run.config import CacheConfig
from globe.run.evaluate import DEFAULT_TEXT, EvalText
from globe.run.load import ModelLoad


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `globe eval` and `globe bench`: text, windows, timings, device and dtype."""
    a = p.add_argument
    a("--cache-size", type=int, help="experts per layer kept precomposed in cached mode (default: as many as "
                                     "--cache-bytes allows)")
    a("--cache-bytes", type=int, help="bytes of the cached mode's cache, all layers together (default 4 %% of the "
                                      "original model's bytes)")
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
    a("--hit-tokens", type=int, default=256, help="last tokens of the text decoded one by one to count cache hits (default 256)")
    a("--no-speed", action="store_true", help="skip the prefill/decode timings")
    a("--device", default="auto", choices=DEVICES, help="device; auto = cuda, else mps, else cpu (default auto)")
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
    """ConfigError naming the option when a count is out of range; OutputError when an output (--metrics,
    --plots, -o) would land in an input (the model, the artifact, a text, the tokenizer)."""
    for flag, attr, low in _COUNTS:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low} (got {value})")
    if args.stride is not None and args.stride > args.max_length:
        raise ConfigError(f"--stride ({args.stride}) must be <= --max-length ({args.max_length})")
    inputs = [args.model_dir, getattr(args, "globe", None), args.text, args.calib, args.tokenizer,
              *(getattr(args, name, None) for name in ("sweep", "original", "task_dir"))]
    for flag, attr in (("--metrics", "metrics"), ("--plots", "plots"), ("-o", "out")):
        if getattr(args, attr, None):
            outputs.check_not_an_input(getattr(args, attr), inputs, flag=flag)


def model_load(args: argparse.Namespace) -> ModelLoad:
    """The model `globe eval` / `globe bench` measures (bench has no --mode: the default, overridden per variant)."""
    check_eval_options(args)
    return ModelLoad(model_dir=args.model_dir, artifact=args.globe, mode=getattr(args, "mode", CacheConfig.mode),
                     cache_size=args.cache_size, cache_bytes=args.cache_bytes, device=args.device, dtype=args.dtype,
                     tokenizer=args.tokenizer, force=args.force)


def eval_text(args: argparse.Namespace) -> EvalText:
    return EvalText(text=args.text, calib=args.calib, warmup_tokens=args.warmup_tokens, max_length=args.max_length,
                    stride=args.stride, max_tokens=args.max_tokens, prefill_tokens=args.prefill_tokens,
                    decode_tokens=args.decode_tokens, repeats=args.repeats, hit_tokens=args.hit_tokens,
                    no_speed=args.no_speed)
