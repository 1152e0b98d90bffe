"""The whole-expert refinement (`globe compress --expert-steps N`, globe.fit.engine.expert): KL / top-1 / perplexity
on held-out text with and without it, at one total cut, self-calibrated, unquantized and quantized (the default).

Per model (default: the embedded model, where --expert-steps and the learning rate are tuned, then the three
evaluation models in benchmarks/models/, scored without retuning): the model samples --calib-tokens tokens itself
(seed 0, temperature 1; what `globe compress` does), the statistics and the routed samples are collected once, the
activation-aware fit runs once unquantized at the cut, then for each of --bits (none, 4) and each STEPS:LR of
--grid (0 = the fit as it is) the expert phase and the quantize stage run as `globe compress` runs them
(globe.fit.engine.model.expert_then_quantize), and the result is scored against the original on the model's held-out
text (globe.eval.divergence: KL(original || compressed) per token in nats, top-1 agreement, perplexity). After
each quantized row with an expert phase, each STEPS:LR of --quant-grid adds a row with the quantized expert phase
(globe.fit.engine.quant_expert) on that row's quantized factors. One JSON (--out), rewritten after every row.

    OMP_NUM_THREADS=1 python benchmarks/whole_expert.py                                       # all four models
    OMP_NUM_THREADS=1 python benchmarks/whole_expert.py globe/assets/globe-tiny-moe --grid 0 50:0.01 100:0.01 \
        --out /tmp/tune.json                                                                 # tuning only
    OMP_NUM_THREADS=1 python benchmarks/whole_expert.py globe/assets/globe-tiny-moe --grid 200:0.002 --bits 4 \
        --quant-grid 40:0.002 60:0.002 --out /tmp/qtune.json          # tuning the quantized expert phase
    OMP_NUM_THREADS=1 python benchmarks/whole_expert.py benchmarks/models/{mixtral-e8-top2,upcycled-qwen2moe,\
scratch-qwen2moe-e48} --cut 0.35 0.25 --grid 200:0.002 --bits 4 --quant-grid 60:0.002 \
        --out benchmarks/results/quant_expert.json                         # scored without retuning
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import new_report, quiet_logging  # noqa: E402

from globe.fit.expert_config import ExpertConfig  # noqa: E402

log = logging.getLogger("benchmarks.whole_expert")
MODELS = ("globe/assets/globe-tiny-moe", "benchmarks/models/mixtral-e8-top2", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")
TUNED = "200:0.002"     # STEPS:LR chosen on the embedded model (globe-tiny-moe) only (runs/tune_tiny*.json)
TUNED_QUANT = "60:0.002"   # the quantized expert phase's, on the embedded model only (quant_expert_tuning.json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: all four)")
    a("--cut", type=float, nargs="+", default=[0.35], help="cut(s) of TOTAL params (default 0.35)")
    a("--calib-tokens", type=int, default=8192, help="self-generated calibration tokens (default 8192)")
    a("--samples", type=int, default=ExpertConfig().samples, help="routed tokens kept per expert (default: "
      "compress's)")
    a("--batch", type=int, default=ExpertConfig().batch, help="samples per expert and step (default: compress's)")
    a("--seed", type=int, default=0, help="seed of the sampling and the fit (default 0)")
    a("--window", type=int, default=256, help="scoring window, non-overlapping (default 256)")
    a("--eval-tokens", type=int, default=16384, help="score the first N held-out tokens (default 16384)")
    a("--grid", nargs="+", default=["0", TUNED], metavar="STEPS[:LR]", help="expert phases (0: none)")
    a("--bits", nargs="+", default=["none", "4"], help="quantization of the factors (none, or bits)")
    a("--quant-grid", nargs="+", default=["0"], metavar="STEPS[:LR]", help="quantized expert phases after each "
      "quantized row (globe.fit.engine.quant_expert; 0: none): one more row each (default: none)")
    a("--work", default=str(REPO / "runs" / "whole-expert"), help="calibration files kept here")
    a("--out", default=str(REPO / "benchmarks" / "results" / "whole_expert.json"), help="JSON output path")
    return p.parse_args(argv)


def score(original, model_dir: Path, result, ids: torch.Tensor, window: int) -> dict:
    from globe.eval import divergence
    from globe.export import load_model
    from globe.runtime import apply_globe
    compressed = apply_globe(load_model(str(model_dir)), result, mode="dense")
    div = divergence(original, compressed, ids, max_length=window)
    return {k: div[k] for k in ("kl", "top1", "perplexity")}


def run_model(model_dir: Path, args, report: dict, save) -> None:
    from globe.eval import encode_text
    from globe.export import load_model
    from globe.run.calibrate import CalibrateRun, run_calibrate_with_ids
    from globe.run.tokenizer import load_tokenizer
    held = encode_text(load_tokenizer(str(model_dir)), (model_dir / "heldout.txt").read_text(encoding="utf-8"))
    held = held[:args.eval_tokens] if args.eval_tokens else held
    original = load_model(str(model_dir))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = CalibrateRun(str(model_dir), None, str(work / f"{model_dir.name}.stats.safetensors"),
                       max_tokens=args.calib_tokens, seed=args.seed, overwrite=True, routed=args.samples)
    stats, _ = run_calibrate_with_ids(run)
    calib_s = round(time.perf_counter() - t0, 1)
    for cut in args.cut:
        run_cut(model_dir, args, report, save, stats, run.out, cut, original, held, calib_s)


def run_cut(model_dir: Path, args, report: dict, save, stats, stats_file: str, cut: float, original, held,
            calib_s: float) -> None:
    from globe.calibration.routed import save_routed
    from globe.core.result import FitResult
    from globe.eval import perplexity
    from globe.fit.config import FitConfig, TrainConfig
    from globe.fit.engine import fit_model
    from globe.fit.engine.model import expert_then_quantize, quant_expert
    from globe.fit.objectives.base import objective_class
    from globe.io import open_checkpoint
    from globe.run.fit import apply_total_cut
    work = Path(args.work)
    t0 = time.perf_counter()
    cfg = apply_total_cut(FitConfig(train=TrainConfig(seed=args.seed)), model_dir, cut)
    cfg.activation.stats = stats_file
    cfg.expert.samples_file = str(save_routed(stats.routed, work / f"{model_dir.name}.routed.safetensors"))
    base = fit_model(model_dir, cfg)
    fit_s = round(calib_s + time.perf_counter() - t0, 1)
    name = str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir)
    entry = {"model": name, "original_perplexity": perplexity(original, held, args.window)["perplexity"],
             "cut": cut, "fit_seconds": fit_s, "shape": {f: fam.shape for f, fam in base.families.items()},
             "rows": []}
    report["models"].append(entry)
    kind = objective_class(cfg)
    with open_checkpoint(model_dir) as reader:
        data = kind.load(cfg, reader.inventory())
        for bits in args.bits:
            for spec in args.grid:
                steps, _, lr = spec.partition(":")
                variant = copy.deepcopy(cfg)
                variant.quant.bits = None if bits == "none" else int(bits)
                variant.expert = dataclasses.replace(cfg.expert, steps=int(steps), batch=args.batch,
                                                     lr=float(lr) if lr else cfg.expert.lr)
                t1 = time.perf_counter()
                families = {f: copy.deepcopy(fam) for f, fam in base.families.items()}
                families = expert_then_quantize(reader, families, variant, data, kind)
                seconds = round(time.perf_counter() - t1, 1)
                result = FitResult(families=families, config=variant, source=dict(base.source))
                expert = families["gate"].metrics.get("expert", {})
                row = {"bits": variant.quant.bits, "expert_steps": int(steps), "expert_lr": variant.expert.lr,
                       "samples": args.samples, "batch": args.batch, "quant_steps": 0,
                       "seconds": seconds, "output_error_before": expert.get("error_before"),
                       "output_error_after": expert.get("error_after"), "accepted": expert.get("accepted"),
                       "best_step": expert.get("best_step"),
                       **score(original, model_dir, result, held, args.window)}
                entry["rows"].append(row)
                log.info("%s cut %.2f bits=%s expert=%s: KL %.6f top-1 %.4f ppl %.3f (%.0f s)", model_dir.name, cut,
                         bits, spec, row["kl"], row["top1"], row["perplexity"], seconds)
                save()
                if variant.quant.bits is None or not variant.expert.enabled:
                    continue
                for qspec in args.quant_grid:        # the quantized expert phase on this row's quantized factors
                    qsteps, _, qlr = qspec.partition(":")
                    if int(qsteps) == 0:
                        continue
                    qvariant = copy.deepcopy(variant)
                    qvariant.expert = dataclasses.replace(variant.expert, quant_steps=int(qsteps),
                                                          quant_lr=float(qlr) if qlr else variant.expert.quant_lr)
                    t2 = time.perf_counter()
                    qfamilies = quant_expert(reader, {f: copy.deepcopy(fam) for f, fam in families.items()}, qvariant)
                    qseconds = round(time.perf_counter() - t2, 1)
                    qinfo = qfamilies["gate"].metrics.get("quant_expert", {})
                    qrow = {**{k: row[k] for k in ("bits", "expert_steps", "expert_lr", "samples", "batch")},
                            "quant_steps": int(qsteps), "quant_lr": qvariant.expert.quant_lr,
                            "seconds": round(seconds + qseconds, 1), "quant_seconds": qseconds,
                            "output_error_before": qinfo.get("error_before"),
                            "output_error_after": qinfo.get("error_after"), "accepted": qinfo.get("accepted"),
                            "best_step": qinfo.get("best_step"),
                            **score(original, model_dir, FitResult(families=qfamilies, config=qvariant,
                                                                   source=dict(base.source)), held, args.window)}
                    entry["rows"].append(qrow)
                    log.info("%s cut %.2f bits=%s expert=%s quant=%s: KL %.6f top-1 %.4f ppl %.3f (+%.0f s)",
                             model_dir.name, cut, bits, spec, qspec, qrow["kl"], qrow["top1"], qrow["perplexity"],
                             qseconds)
                    save()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_logging()
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    out = Path(args.out)
    report = new_report(args)
    report["models"] = []

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    for model in args.models:
        run_model(Path(model), args, report, save)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("| model | cut | bits | expert steps | quantized steps | KL | top-1 | perplexity | output error before -> "
          "after | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in report["models"]:
        for r in e["rows"]:
            err = "" if r["output_error_before"] is None else \
                f"{r['output_error_before']:.4f} -> {r['output_error_after']:.4f}"
            print(f"| {Path(e['model']).name} | {e['cut']} | {r['bits'] or 'bf16'} | {r['expert_steps']} | "
                  f"{r.get('quant_steps', 0)}{':%g' % r['quant_lr'] if r.get('quant_steps') else ''} | {r['kl']:.6f} | "
                  f"{r['top1']:.4f} | {r['perplexity']:.3f} | {err} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
