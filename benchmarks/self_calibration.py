"""Self-generated against real calibration text: KL / top-1 / perplexity of GloBE at one total cut.

For each model (default: the embedded model and the two evaluation models in benchmarks/models/) and the cut of
its TOTAL parameters (default 0.35), three fits at the same budget, each applied to the model (dense mode) and
scored against the original on the model's held-out text (globe.eval.divergence: KL(original || compressed) per
token in nats, top-1 agreement, perplexity; non-overlapping --window-token windows over all of it):
  weight-space     the plain weight-error fit (`globe compress --no-calibration`)
  self-generated   activation-aware, calibrated on --calib-tokens tokens the model samples itself (seed 0,
                   temperature 1: what `globe compress` does without --calibration-text)
  real-text        activation-aware, calibrated on the first --calib-tokens tokens of the model's calibration
                   text (MODEL/calib.txt, a split disjoint from training and held-out; for the embedded model its
                   training split corpus/train.txt, rebuilt by scripts/build_corpus.py)
Statistics come from globe.run.calibrate (what `globe compress` runs). One JSON (--out), rewritten after every row.

    OMP_NUM_THREADS=1 python benchmarks/self_calibration.py
    python benchmarks/self_calibration.py benchmarks/models/upcycled-qwen2moe --calib-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import new_report, quiet_logging  # noqa: E402

log = logging.getLogger("benchmarks.self_calibration")
MODELS = ("globe/assets/globe-tiny-moe", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")
METHODS = ("weight-space", "self-generated", "real-text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: all three)")
    a("--cut", type=float, default=0.35, help="cut of TOTAL params (default 0.35)")
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="fits to run (default: all)")
    a("--calib-tokens", type=int, default=8192, help="calibration tokens, the same for both sources (default 8192)")
    a("--seed", type=int, default=0, help="seed of the fits and of the self-generated text (default 0)")
    a("--window", type=int, default=256, help="scoring window, non-overlapping (default 256)")
    a("--eval-tokens", type=int, default=0, help="score the first N held-out tokens (default 0: all)")
    a("--out", default=str(REPO / "benchmarks" / "results" / "self_calibration.json"), help="JSON output path")
    return p.parse_args(argv)


def calib_text(model_dir: Path) -> Path:
    from globe.assets import DEFAULT_MODEL_DIR
    if (model_dir / "calib.txt").is_file():
        return model_dir / "calib.txt"
    if model_dir.resolve() == Path(DEFAULT_MODEL_DIR).resolve():
        path = REPO / "corpus" / "train.txt"
        if path.is_file():
            return path
    raise SystemExit(f"self_calibration.py: error: no calibration text for {model_dir} (MODEL/calib.txt, or "
                     f"corpus/train.txt for the embedded model: python scripts/build_corpus.py)")


def statistics(model_dir: Path, method: str, args, work: Path) -> tuple[str, dict, float]:
    """(statistics file, where the calibration came from, seconds) of one calibration source."""
    from globe.run.calibrate import CalibrateRun, run_calibrate
    text = str(calib_text(model_dir)) if method == "real-text" else None
    run = CalibrateRun(str(model_dir), text, str(work / f"{method}.safetensors"), max_tokens=args.calib_tokens,
                       window=args.window, seed=args.seed)
    t0 = time.perf_counter()
    stats = run_calibrate(run)
    return run.out, stats.info["calibration"], time.perf_counter() - t0


def fit(model_dir: Path, method: str, args, work: Path) -> tuple:
    """(FitResult, calibration info or None, calibration seconds, fit seconds) at the cut."""
    from globe.fit.config import FitConfig, TrainConfig
    from globe.fit.engine import fit_model
    from globe.run.fit import apply_total_cut
    cfg = FitConfig(train=TrainConfig(seed=args.seed))
    apply_total_cut(cfg, model_dir, args.cut)
    info, cal_s = None, 0.0
    if method != "weight-space":
        cfg.activation.stats, info, cal_s = statistics(model_dir, method, args, work)
    t0 = time.perf_counter()
    result = fit_model(model_dir, cfg)
    return result, info, cal_s, time.perf_counter() - t0


def score(original, model_dir: Path, result, ids: torch.Tensor, window: int) -> dict:
    from globe.eval import divergence
    from globe.export import load_model
    from globe.runtime import apply_globe
    compressed = apply_globe(load_model(model_dir), result, mode="dense")
    return divergence(original, compressed, ids, max_length=window)


def run_model(model_dir: Path, args) -> dict:
    from globe.eval import encode_text, perplexity
    from globe.export import load_model
    from globe.io import open_checkpoint
    from globe.run.fit import total_cut_of
    from globe.run.tokenizer import load_tokenizer
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    ids = encode_text(load_tokenizer(model_dir), (model_dir / "heldout.txt").read_text(encoding="utf-8"))
    ids = ids[:args.eval_tokens] if args.eval_tokens else ids
    original = load_model(model_dir)
    base = perplexity(original, ids, args.window)
    entry = {"model": {"dir": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
                       "model_type": inv.model_type, "layers": len(inv.moe_layers), "experts": inv.num_experts,
                       "top_k": inv.top_k, "p": inv.p, "d": inv.d, "total_params": inv.total_params,
                       "heldout_tokens_scored": base["tokens"], "original_perplexity": base["perplexity"],
                       "calibration_text": str(calib_text(model_dir).relative_to(REPO))}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="self-calibration-") as tmp:
        for method in args.methods:
            result, info, cal_s, fit_s = fit(model_dir, method, args, Path(tmp))
            div = score(original, model_dir, result, ids, args.window)
            row = {"method": method, "kl": div["kl"], "top1": div["top1"], "perplexity": div["perplexity"],
                   "kl_max": div["kl_max"], "tokens": div["tokens"], "total_cut": total_cut_of(result),
                   "calibration": info, "calibration_seconds": round(cal_s, 1), "fit_seconds": round(fit_s, 1),
                   "families": {f: {"m": fam.shape["m"], "r": fam.shape["r"], "rel_err": fam.metrics["rel_err"],
                                    "act_rel_err": fam.metrics.get("act_rel_err"),
                                    "median_support": fam.metrics["median_support"]}
                                for f, fam in result.families.items()}}
            entry["rows"].append(row)
            log.info("%s %s: KL %.5f, top-1 %.4f, perplexity %.3f (original %.3f); calibration %.0f s, fit %.0f s",
                     model_dir.name, method, row["kl"], row["top1"], row["perplexity"], base["perplexity"], cal_s,
                     fit_s)
            yield entry


def print_table(report: dict) -> None:
    print("| model (original perplexity) | fit | KL (nats/token) | top-1 agreement | perplexity | fit s |")
    print("|---|---|---|---|---|---|")
    for entry in report["models"]:
        m = entry["model"]
        for r in entry["rows"]:
            print(f"| {Path(m['dir']).name} ({m['original_perplexity']:.3f}) | {r['method']} | {r['kl']:.5f} | "
                  f"{r['top1']:.4f} | {r['perplexity']:.3f} | {r['calibration_seconds'] + r['fit_seconds']:.0f} |")


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    args = parse_args(argv)
    quiet_logging()
    t0 = time.perf_counter()
    report = new_report(args, ("out", "models"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model_dir in args.models:
        for entry in run_model(Path(model_dir).resolve(), args):
            if not report["models"] or report["models"][-1] is not entry:
                report["models"].append(entry)
            report["seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(out, json.dumps(report, indent=1, default=float))     # partial results survive
    print_table(report)
    return report


if __name__ == "__main__":
    main()
