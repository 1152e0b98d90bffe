"""Fit GloBE banks for a Qwen2-MoE / Qwen1.5-MoE checkpoint and save the artifact.

    python examples/train_qwen_moe.py --out runs/qwen                        # the embedded tiny Qwen2-MoE
    python examples/train_qwen_moe.py --model Qwen/Qwen1.5-MoE-A2.7B --out runs/qwen15 --budget 0.5 --device auto
    python examples/train_qwen_moe.py --out runs/quick --m 8 --r 16 --am-iters 2 --varpro-steps 5   # seconds

Same job as `globe fit`, through the Python API: FitConfig -> globe.fit_model -> globe.save, with every metric
in OUT/metrics.jsonl (and wandb with --wandb offline|online).
"""
from __future__ import annotations

import argparse
import logging

import globe
from globe import tracking
from globe.assets import DEFAULT_MODEL_DIR
from globe.io import open_checkpoint
from globe.io.hub import resolve_model_dir


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="Qwen2-MoE checkpoint dir or hub id")
    p.add_argument("--out", default="runs/qwen_moe", help="artifact directory")
    p.add_argument("--budget", type=float, default=0.5, help="stored / dense params per family")
    p.add_argument("--m", type=int, help="atoms per bank (default: from --budget)")
    p.add_argument("--r", type=int, help="adapter rank (default: from --budget)")
    p.add_argument("--target-support", type=int, default=None, help="target median atoms per expert")
    p.add_argument("--am-iters", type=int, default=None, help="alternating-minimisation iterations")
    p.add_argument("--varpro-steps", type=int, default=None, help="variable-projection L-BFGS evaluations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--wandb", default="disabled", choices=tracking.WANDB_MODES)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir = resolve_model_dir(args.model)
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    if inv.model_type not in ("qwen2_moe", "qwen3_moe"):
        logging.warning("%s is a %s checkpoint, not Qwen2-MoE; fitting it anyway", model_dir, inv.model_type)
    print(f"{inv.model_type}: {len(inv.moe_layers)} MoE layers x {inv.num_experts} experts, p={inv.p}, d={inv.d}")

    cfg = globe.FitConfig()
    cfg.bank.budget, cfg.bank.m, cfg.bank.r, cfg.train.device = args.budget, args.m, args.r, args.device
    if args.target_support is not None:
        cfg.sparsity.target_support = args.target_support
    if args.am_iters is not None:
        cfg.train.am_iters = args.am_iters
    if args.varpro_steps is not None:
        cfg.train.varpro_steps = args.varpro_steps
    with tracking.session(jsonl=f"{args.out}/metrics.jsonl", wandb_mode=args.wandb, config=cfg.to_dict(),
                          append=False):
        result = globe.fit_model(model_dir, cfg)
    globe.save(result, args.out)
    for name, fam in result.families.items():
        params = fam.metrics["params"]
        print(f"{name}: m={fam.shape['m']} r={fam.shape['r']} rel_err={fam.metrics['rel_err']:.4f} "
              f"params={params['stored'] / params['dense']:.3f} of dense, median support "
              f"{fam.metrics['median_support']:.0f}")
    print(f"artifact written to {args.out}")


if __name__ == "__main__":
    main()
