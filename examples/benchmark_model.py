"""Benchmark a GloBE artifact against its original model: perplexity, tokens/s, memory, parameters.

    python examples/benchmark_model.py --artifact runs/qwen_moe                 # embedded model + its text
    python examples/benchmark_model.py --artifact runs/q --model CKPT --text heldout.txt --device auto
    python examples/benchmark_model.py --artifact runs/q --max-tokens 512 --modes cached   # seconds

Loads the checkpoint with transformers (in its stored dtype), evaluates it, then patches a fresh copy with
globe.apply_globe in each runtime mode and evaluates again. Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import transformers

import globe
from globe.assets import DEFAULT_MODEL_DIR
from globe.device import compute_dtype, resolve_device
from globe.eval import encode_text
from globe.export import load_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="artifact directory from `globe fit` / train_qwen_moe.py")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="the checkpoint the artifact was fitted on")
    p.add_argument("--text", default=str(DEFAULT_MODEL_DIR / "heldout.txt"), help="held-out text file")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text scored")
    p.add_argument("--modes", nargs="+", default=["cached", "dense"], choices=["cached", "factored", "dense"])
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", default=None, help="write the reports here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.model, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    calibration = encode_text(tokenizer, text)[:1024]
    artifact = globe.load(args.artifact)
    settings = dict(max_tokens=args.max_tokens, prefill_tokens=128, decode_tokens=8, repeats=1, hit_tokens=64)
    reports = {}
    for variant in ["original", *args.modes]:
        model = load_model(args.model, dtype=dtype, device=str(device))
        if variant != "original":
            globe.apply_globe(model, artifact, mode=variant)
        reports[variant] = globe.evaluate(model, tokenizer, text, calibration_text=calibration, **settings)
    base = reports["original"]["perplexity"]["perplexity"]
    print(f"{'variant':9} {'ppl':>9} {'vs orig':>8} {'decode tok/s':>13} {'routed params':>14}")
    for variant, rep in reports.items():
        ppl = rep["perplexity"]["perplexity"]
        print(f"{variant:9} {ppl:9.3f} {ppl / base:8.4f} {rep['speed']['decode_tok_s']:13.1f} "
              f"{rep['footprint']['routed_ratio']:14.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
        print(f"reports written to {args.json}")


if __name__ == "__main__":
    main()
