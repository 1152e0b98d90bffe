"""Uniform against sensitivity-allocated per-layer ranks (globe.fit.engine.ranks) on the evaluation models:
activation-aware fit at --total-cut 0.35, calibrated like `globe compress` by default (--calibration self: 8192
tokens the model samples itself, seed 0) or on MODEL/calib.txt (--calibration text), scored by KL(original ||
compressed) per token and top-1 agreement on heldout.txt (the first --max-tokens tokens). Models: the names in
benchmarks/models/ or `embedded` (globe/assets/globe-tiny-moe, the model defaults are tuned on). Single thread;
writes benchmarks/results/rank_allocation.json.

    OMP_NUM_THREADS=1 python benchmarks/rank_allocation.py [MODEL_NAME ...] [--max-tokens N] [--calibration text]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from globe.artifact import load
from globe.assets import DEFAULT_MODEL_DIR
from globe.eval.divergence import divergence
from globe.eval.perplexity import encode_text
from globe.export import load_model
from globe.run.calibrate import CalibrateRun, run_calibrate
from globe.runtime import apply_globe

ROOT = Path(__file__).resolve().parent
MODELS = ("embedded", "upcycled-qwen2moe", "scratch-qwen2moe-e48")
OUT = ROOT / "results" / "rank_allocation.json"


def globe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "globe.cli.main", *args], check=True, stdout=subprocess.DEVNULL)


def measure(name: str, work: Path, max_tokens: int, cut: float, calibration: str = "self") -> dict:
    model_dir = Path(DEFAULT_MODEL_DIR) if name == "embedded" else ROOT / "models" / name
    stats = work / f"{name}.stats.safetensors"
    text = str(model_dir / "calib.txt") if calibration == "text" else None
    run_calibrate(CalibrateRun(str(model_dir), text, str(stats), max_tokens=8192, seed=0))
    ids = encode_text(AutoTokenizer.from_pretrained(model_dir), (model_dir / "heldout.txt").read_text())
    reference = load_model(model_dir)
    row = {}
    for allocation in ("uniform", "sensitivity"):
        out = work / f"{name}.{allocation}"
        t0 = time.perf_counter()
        globe("fit", str(model_dir), "--total-cut", str(cut), "--calibration", str(stats), "--rank-allocation",
              allocation, "-o", str(out), "--overwrite")
        seconds = time.perf_counter() - t0
        result = load(out)
        compressed = apply_globe(load_model(model_dir), result, mode="dense")
        div = divergence(reference, compressed, ids, max_tokens=max_tokens)
        row[allocation] = {"kl": div["kl"], "top1": div["top1"], "perplexity": div["perplexity"],
                           "tokens": div["tokens"], "fit_seconds": round(seconds, 1),
                           "stored_params": {f: fam.param_count()["stored"] for f, fam in result.families.items()},
                           "shape": {f: {"m": fam.shape["m"], "r": fam.shape["r"],
                                         "ranks": list(fam.ranks) if fam.ranks else None}
                                     for f, fam in result.families.items()}}
        print(name, allocation, json.dumps(row[allocation]), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--total-cut", type=float, default=0.35)
    ap.add_argument("--calibration", choices=("self", "text"), default="self",
                    help="self-generated (what globe compress does) or MODEL/calib.txt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = {"total_cut": args.total_cut, "heldout_max_tokens": args.max_tokens,
                             "calibration": args.calibration, "calibration_tokens": 8192,
                             **measure(name, Path(tmp), args.max_tokens, args.total_cut, args.calibration)}
            OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
