"""Activation-aware fitting benchmark: held-out perplexity at equal total parameters, weight-space vs activation-aware
GloBE, with and without compressed down projections.

Calibration statistics (`globe calibrate`) come from the model's TRAINING split (default corpus/train.txt, rebuilt
by scripts/build_corpus.py; the held-out text is a disjoint set of documents). For each target cut of the model's
TOTAL parameters it fits every method and reports total params, perplexity and the increase over the original:
  weight-space            gate, up; plain Frobenius objective (VarPro gets the activation stage's evaluations
                          too, so both spend the same L-BFGS budget)
  activation-aware/layer  gate, up; AM on W L_g, then VarPro under ||(W - W_hat) L_l||^2, C_l = L_l L_l^T per layer
  activation-aware        the same with each expert's C from its routed tokens, blended with C_l (the default)
  + channel weights       rows weighted by their channel's first-order effect on the expert output
  + routing weights       errors weighted by routing frequency
  weight-space + down     gate, up, down at the same total cut (each family gets the same budget)
  activation-aware + down the same, activation-aware (default settings)
Writes JSON (default benchmarks/results/activation_aware.json).

    python benchmarks/activation_aware.py
    python benchmarks/activation_aware.py --reductions 0.5 --methods "weight-space + down" "activation-aware + down" \
        --out benchmarks/results/activation_aware_50.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from globe.assets import DEFAULT_MODEL_DIR
from globe.calibration import collect_stats, load_stats, save_stats
from globe.core.files import atomic_write_text
from globe.eval import encode_text, perplexity
from globe.export import load_model
from globe.fit.solvers.budget import total_cut_budget
from globe.fit.config import ActivationConfig, BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_model
from globe.io import open_checkpoint
from globe.runtime import apply_globe

log = logging.getLogger("benchmarks.activation_aware")
REPO = Path(__file__).resolve().parents[1]
# method -> (families, ActivationConfig overrides or None for the weight-space fit)
GATE_UP, ALL = ("gate", "up"), ("gate", "up", "down")
METHODS = {
    "weight-space": (GATE_UP, None),
    "activation-aware/layer": (GATE_UP, {"per_expert": False}),
    "activation-aware": (GATE_UP, {}),
    "activation-aware + channel weights": (GATE_UP, {"channel_weights": True}),
    "activation-aware + routing weights": (GATE_UP, {"routing_weights": True}),
    "weight-space + down": (ALL, None),
    "activation-aware + down": (ALL, {}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the embedded model)")
    a("--text", default=str(DEFAULT_MODEL_DIR / "heldout.txt"), help="held-out text for perplexity")
    a("--calib", default=str(REPO / "corpus" / "train.txt"), help="calibration text (default corpus/train.txt)")
    a("--calib-tokens", type=int, default=32768, help="calibration tokens (default 32768)")
    a("--stats", default=str(REPO / "runs" / "activation_stats.safetensors"),
      help="statistics file: reused if it exists, else written")
    a("--reductions", type=float, nargs="+", default=[0.25, 0.40], help="target cuts of TOTAL params")
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    a("--target-support", type=int, default=8, help="target median support (lowered when the budget needs it)")
    a("--am-iters", type=int, default=20, help="AM iterations of each fit (default 20)")
    a("--varpro-steps", type=int, default=30, help="weight-space VarPro evaluations (default 30)")
    a("--act-steps", type=int, default=100, help="activation-aware VarPro evaluations (default 100)")
    a("--ppl-tokens", type=int, default=0, help="score only the first N held-out tokens (default 0: all)")
    a("--window", type=int, default=256, help="perplexity window (non-overlapping)")
    a("--out", default=str(REPO / "benchmarks" / "results" / "activation_aware.json"), help="JSON output path")
    return p.parse_args()


def method_config(method: str, reduction: float, inv, stats_path: str, args) -> FitConfig:
    families, overrides = METHODS[method]
    budget, support = total_cut_budget(reduction, inv, families, args.target_support)
    aware = overrides is not None
    varpro = args.varpro_steps + (0 if aware else args.act_steps)
    activation = ActivationConfig(stats=stats_path, steps=args.act_steps, **overrides) if aware else \
        ActivationConfig()
    return FitConfig(bank=BankConfig(budget=budget, families=families),
                     sparsity=SparsityConfig(target_support=support),
                     train=TrainConfig(am_iters=args.am_iters, varpro_steps=varpro), activation=activation)


def calibration(model, tokenizer, args) -> tuple[str, dict]:
    """Path of the statistics file (collected now unless it exists) and a description of it."""
    path = Path(args.stats)
    if not path.is_file():
        text = Path(args.calib).read_text(encoding="utf-8")
        ids = encode_text(tokenizer, text[:50 * args.calib_tokens])[:args.calib_tokens]
        t0 = time.perf_counter()
        stats = collect_stats(model, ids, window=args.window, info={"text": str(args.calib)})
        save_stats(stats, path)
        log.info("calibrated on %d tokens in %.0f s -> %s", ids.numel(), time.perf_counter() - t0, path)
    stats = load_stats(path)
    return str(path), {"file": str(path), "text": stats.info.get("text"), "tokens": stats.tokens}


def run_method(model_dir: Path, method: str, reduction: float, inv, stats_path: str, ppl_ids: torch.Tensor,
               original_ppl: float, args) -> dict:
    cfg = method_config(method, reduction, inv, stats_path, args)
    t0 = time.perf_counter()
    result = fit_model(model_dir, cfg)
    seconds = time.perf_counter() - t0
    saved = sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families)
    model = apply_globe(load_model(model_dir), result, mode="dense")
    ppl = perplexity(model, ppl_ids, args.window)["perplexity"]
    row = {"method": method, "target_total_reduction": reduction, "total_params": inv.total_params - saved,
           "total_reduction": saved / inv.total_params, "perplexity": ppl, "delta": ppl - original_ppl,
           "delta_pct": 100 * (ppl / original_ppl - 1), "fit_seconds": round(seconds, 1),
           "budget_per_family": round(cfg.bank.budget, 5), "target_support": cfg.sparsity.target_support,
           "families": {f: {k: fam.metrics.get(k) for k in ("rel_err", "act_rel_err", "median_support")}
                        | {"m": fam.shape["m"], "r": fam.shape["r"],
                           "params_ratio": fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"]}
                        for f, fam in result.families.items()}}
    log.info("-%.0f%% %s: %d params, perplexity %.4f (%+.4f) in %.0f s", 100 * reduction, method,
             row["total_params"], ppl, row["delta"], seconds)
    return row


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("globe.fit.engine", "globe.fit.solvers.am", "globe.fit.solvers.varpro", "globe.fit.solvers.budget", "globe.io.reader",
                 "globe.calibration.collect"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers
    t_start = time.perf_counter()
    model_dir = Path(args.model)
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    original = load_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = encode_text(tokenizer, Path(args.text).read_text(encoding="utf-8"))
    ppl_ids = ids[:args.ppl_tokens] if args.ppl_tokens else ids
    stats_path, calib = calibration(original, tokenizer, args)
    original_ppl = perplexity(original, ppl_ids, args.window)["perplexity"]
    log.info("original perplexity %.4f", original_ppl)
    report = {"model": {"dir": str(model_dir), "model_type": inv.model_type, "total_params": inv.total_params,
                        "dtype": str(next(original.parameters()).dtype), "p": inv.p, "d": inv.d,
                        "moe_layers": len(inv.moe_layers), "experts": inv.num_experts, "top_k": inv.top_k},
              "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
              "calibration": calib, "heldout_tokens": int(ppl_ids.numel()),
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()},
              "rows": [{"method": "dense", "target_total_reduction": 0.0, "total_params": inv.total_params,
                        "total_reduction": 0.0, "perplexity": original_ppl, "delta": 0.0, "delta_pct": 0.0}]}
    out = Path(args.out)
    for reduction in args.reductions:
        for method in args.methods:
            report["rows"].append(run_method(model_dir, method, reduction, inv, stats_path, ppl_ids, original_ppl,
                                             args))
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            atomic_write_text(out, json.dumps(report, indent=1, default=float))      # partial results survive
    log.info("wrote %s in %.0f s", out, report["seconds"])
    for row in report["rows"]:
        print(f"{row['method']:36} -{100 * row['total_reduction']:4.1f}% {row['total_params']:>10,} "
              f"ppl {row['perplexity']:8.3f} delta {row['delta']:+8.3f}")


if __name__ == "__main__":
    main()
