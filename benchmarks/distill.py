"""Distillation of the compressed parameters (globe.tune.distill): KL / top-1 / perplexity on held-out text with
and without it, at one total cut, self-calibrated (what `globe compress` does).

Per model (default: the embedded model, where --distill-steps / --distill-lr were tuned, and the two evaluation
models in benchmarks/models/, scored without retuning): the model samples --calib-tokens tokens itself (seed 0,
temperature 1), the activation-aware fit runs at the cut on their statistics, then for each STEPS:LR of --grid the
fit is distilled on the same tokens and scored against the original on the model's held-out text (disjoint from
the self-generated calibration; globe.eval.divergence: KL(original || compressed) per token in nats, top-1
agreement, perplexity). The fit and the calibration tokens are kept in --work, so a rerun (another grid) reuses
them. One JSON (--out), rewritten after every row.

    OMP_NUM_THREADS=1 python benchmarks/distill.py                                   # the default's effect, all models
    OMP_NUM_THREADS=1 python benchmarks/distill.py globe/assets/globe-tiny-moe --grid 50:1e-3 100:1e-3 100:3e-3 \
        --eval-tokens 32768 --out /tmp/tune.json                                      # tuning, embedded model only
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import new_report, quiet_logging  # noqa: E402

from globe.tune.config import DistillConfig  # noqa: E402

TUNED_STEPS = 100      # the step count tuned on the embedded model (the product default is 0: off)

log = logging.getLogger("benchmarks.distill")
MODELS = ("globe/assets/globe-tiny-moe", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    default = DistillConfig()
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: all three)")
    a("--cut", type=float, default=0.35, help="cut of TOTAL params (default 0.35)")
    a("--calib-tokens", type=int, default=8192, help="self-generated calibration tokens (default 8192)")
    a("--seed", type=int, default=0, help="seed of the sampling, the fit and the distillation (default 0)")
    a("--window", type=int, default=256, help="scoring window, non-overlapping (default 256)")
    a("--eval-tokens", type=int, default=0, help="score the first N held-out tokens (default 0: all)")
    a("--grid", nargs="+", default=[f"{TUNED_STEPS}:{default.lr:g}"], metavar="STEPS:LR",
      help="distillations to score (default: the compress default)")
    a("--batch", type=int, default=default.batch, help=f"sequences per step (default {default.batch})")
    a("--top-k", type=int, default=default.top_k, help=f"teacher log-probs kept (default {default.top_k})")
    a("--work", default=str(REPO / "runs" / "distill-bench"), help="fits and calibration tokens kept here")
    a("--out", default=str(REPO / "benchmarks" / "results" / "distill.json"), help="JSON output path")
    return p.parse_args(argv)


def fitted(model_dir: Path, args, work: Path):
    """(FitResult, calibration ids, calibration info, seconds): the self-calibrated fit at the cut, cached."""
    from globe.artifact import load, save
    from globe.fit.config import FitConfig, TrainConfig
    from globe.fit.engine import fit_model
    from globe.run.calibrate import CalibrateRun, run_calibrate_with_ids
    from globe.run.fit import apply_total_cut
    from safetensors.torch import load_file, save_file
    key = work / f"{model_dir.name}.cut{args.cut}.tok{args.calib_tokens}.seed{args.seed}"
    if (key / "globe_config.json").is_file() and (key / "ids.safetensors").is_file():
        meta = json.loads((key / "run.json").read_text())
        return load(key), load_file(key / "ids.safetensors")["ids"], meta["calibration"], meta["seconds"]
    cfg = FitConfig(train=TrainConfig(seed=args.seed))
    apply_total_cut(cfg, model_dir, args.cut)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = CalibrateRun(str(model_dir), None, str(work / f"{model_dir.name}.stats.safetensors"),
                       max_tokens=args.calib_tokens, window=args.window, seed=args.seed, overwrite=True)
    stats, ids = run_calibrate_with_ids(run)
    cfg.activation.stats = run.out
    result = fit_model(model_dir, cfg)
    seconds = round(time.perf_counter() - t0, 1)
    save(result, key)
    save_file({"ids": ids.contiguous()}, str(key / "ids.safetensors"))
    (key / "run.json").write_text(json.dumps({"calibration": stats.info["calibration"], "seconds": seconds}))
    return result, ids, stats.info["calibration"], seconds


def score(original, model_dir: Path, result, ids: torch.Tensor, window: int) -> dict:
    from globe.eval import divergence
    from globe.export import load_model
    from globe.runtime import apply_globe
    compressed = apply_globe(load_model(model_dir), result, mode="dense")
    div = divergence(original, compressed, ids, max_length=window)
    return {k: div[k] for k in ("kl", "top1", "perplexity", "kl_max", "tokens")}


def run_model(model_dir: Path, args, report: dict, save) -> None:
    from globe.eval import encode_text, perplexity
    from globe.export import load_model
    from globe.run.fit import total_cut_of
    from globe.run.tokenizer import load_tokenizer
    from globe.tune.distill import distill_checkpoint
    held = encode_text(load_tokenizer(model_dir), (model_dir / "heldout.txt").read_text(encoding="utf-8"))
    held = held[:args.eval_tokens] if args.eval_tokens else held
    original = load_model(model_dir)
    base = perplexity(original, held, args.window)
    result, ids, calibration, fit_s = fitted(model_dir, args, Path(args.work))
    name = str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir)
    entry = {"model": name, "original_perplexity": base["perplexity"], "total_cut": total_cut_of(result),
             "calibration": calibration, "fit_seconds": fit_s, "rows": []}
    report["models"].append(entry)
    entry["rows"].append({"distill": None, **score(original, model_dir, result, held, args.window)})
    log.info("%s without distillation: KL %.6f top-1 %.4f", model_dir.name, entry["rows"][0]["kl"],
             entry["rows"][0]["top1"])
    save()
    for spec in args.grid:
        steps, lr = spec.split(":")
        cfg = DistillConfig(steps=int(steps), lr=float(lr), batch=args.batch, top_k=args.top_k, seed=args.seed)
        distilled, info = distill_checkpoint(str(model_dir), result, ids, cfg, window=args.window)
        row = {"distill": info, **score(original, model_dir, distilled, held, args.window)}
        entry["rows"].append(row)
        log.info("%s distilled %s: KL %.6f top-1 %.4f (%.0f s, validation KL %s -> %s)", model_dir.name, spec,
                 row["kl"], row["top1"], info.get("seconds", 0), info.get("validation_kl_before"),
                 info.get("validation_kl_after"))
        save()


def print_table(report: dict) -> None:
    print("| model (original perplexity) | distillation (steps, lr) | KL (nats/token) | top-1 | perplexity | s |")
    print("|---|---|---|---|---|---|")
    for e in report["models"]:
        for r in e["rows"]:
            d = r["distill"]
            how = "none" if d is None else (f"{d['config']['steps']}, {d['config']['lr']:g}"
                                            + ("" if d.get("accepted", True) else " (rejected)"))
            print(f"| {Path(e['model']).name} ({e['original_perplexity']:.3f}) | {how} | {r['kl']:.6f} | "
                  f"{r['top1']:.4f} | {r['perplexity']:.3f} | {0 if d is None else d.get('seconds', 0):.0f} |")


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    args = parse_args(argv)
    quiet_logging()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    report = new_report(args, ("out", "models", "work"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out, json.dumps(report, indent=1, default=float))          # partial results survive
    for model_dir in args.models:
        run_model(Path(model_dir).resolve(), args, report, save)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
