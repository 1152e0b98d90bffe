"""`globe fit`: fit the gate/up (optionally down) banks of a checkpoint and write OUT/banks.safetensors +
OUT/globe_config.json; with --calibration STATS the fit minimises the activation-weighted error.

Every metric the fit produces (AM iterations, variable projection, finished families) is also appended to
OUT/metrics.jsonl (--metrics), and to Weights & Biases with --wandb offline|online (disabled by default).
This module turns the options into a FitConfig and a globe.run.fit.FitRun, and prints what the run returns.
"""
from __future__ import annotations

import argparse
import logging

from globe.assets import DEFAULT_MODEL_DIR
from globe.cli import dry_run
from globe.core.outputs import json_text
from globe.device import DEVICES
from globe.errors import ConfigError
from globe.fit.config import CODERS, INITS, PHIS, QUANT_BITS, QUANT_METHODS, RANK_ALLOCATIONS, FitConfig
from globe.run.config import WandbConfig
from globe.run.fit import FitRun, apply_total_cut, fit_summary, format_fit_summary, run_fit
from globe.tracking import WANDB_MODES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit global banks for the routed experts' gate/up projections",
                       description="Fit one shared bank per family (gate, up) over all layers' routed experts.")
    p.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
                   help="checkpoint directory (config.json + *.safetensors); default: the embedded tiny model")
    p.add_argument("-o", "--out", required=True, help="output directory for the artifact")
    p.add_argument("--config", help="fit config file (JSON or YAML, as written into globe_config.json)")
    p.add_argument("--budget", type=float, help="stored params / dense params per family, in (0, 1) (default 0.5)")
    p.add_argument("--total-cut", type=float, metavar="C",
                   help="cut of the model's TOTAL parameters in (0, 1), e.g. 0.25; sets --budget per family "
                        "(every fitted family shrinks by the same fraction)")
    add_fit_options(p)
    p.add_argument("--calibration", metavar="STATS",
                   help="activation statistics from `globe calibrate`: fit the activation-weighted error "
                        "||(W - W_hat) C^1/2|| instead of the plain weight error")
    p.add_argument("--per-layer", action="store_true",
                   help="with --calibration: one C per MoE layer instead of each expert's C from its routed tokens")
    p.add_argument("--routing-weights", action="store_true",
                   help="with --calibration: weight each expert's error by its routing frequency")
    p.add_argument("--activation-steps", type=int,
                   help="L-BFGS evaluations of the activation-aware refinement (default 100)")
    p.add_argument("--device", choices=DEVICES,
                   help="compute device; auto = cuda, else mps, else cpu (default: --config's, else auto)")
    p.add_argument("--distributed", action="store_true",
                   help="shard the experts across the processes started by torchrun (gloo on CPU, NCCL on CUDA: "
                        "one GPU per process); implied when WORLD_SIZE > 1. Rank 0 writes the artifact")
    p.add_argument("--checkpoint-every", type=int,
                   help="AM iterations between saves of the resume files in OUT/.globe_checkpoint (default 5; 0: phase "
                        "ends only)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit from its resume files in OUT (same result as an "
                        "uninterrupted run)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing an existing artifact")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    dry_run.add_argument(p)
    p.add_argument("--metrics", metavar="FILE", help="JSONL file receiving every metric (default OUT/metrics.jsonl)")
    p.add_argument("--wandb", choices=WANDB_MODES, default=WandbConfig.mode,
                   help=f"Weights & Biases logging (default {WandbConfig.mode}; offline/online need `pip install wandb`); "
                        "one series per family (gate/am_iter/rel_err, up/...); run files go to "
                        "$WANDB_DIR/wandb, or ./wandb when WANDB_DIR is unset")
    p.add_argument("--wandb-project", default=WandbConfig.project, help=f"wandb project (default {WandbConfig.project})")
    p.set_defaults(func=run)


# the options `globe fit` and `globe compress` share: same flags, defaults and help (build_config reads them)
SHARED_FIT_OPTIONS = ("m", "r", "target_support", "init", "phi", "method", "am_iters", "varpro_steps", "cycles",
                      "refine_steps", "families", "seed", "precision", "rank_allocation",
                      "bits", "quant_group", "quant_method", "residual_bits", "residual_group")


def add_fit_options(p: argparse.ArgumentParser) -> None:
    """Declare the bank shape, sparsity and schedule options of a fit (SHARED_FIT_OPTIONS) on `p`."""
    p.add_argument("--m", "--atoms", dest="m", type=int,
                   help="number of atoms per bank (default: chosen from --budget); --atoms is an alias that "
                        "torchrun's own option parser does not mistake for one of its options")
    p.add_argument("--r", "--adapter-rank", dest="r", type=int,
                   help="adapter rank = rows of an atom (default: chosen from --budget); alias --adapter-rank")
    p.add_argument("--target-support", type=int, help="target median number of atoms per expert (default 12)")
    p.add_argument("--init", choices=INITS, help="warm start (default hybrid)")
    p.add_argument("--phi", choices=PHIS, help="nonlinearity applied to mixed atoms (default identity)")
    p.add_argument("--method", choices=CODERS, help="sparse mapping of the codes (default entmax15)")
    p.add_argument("--am-iters", type=int, help="alternating-minimisation iterations (default 30)")
    p.add_argument("--varpro-steps", type=int, help="L-BFGS evaluations of the variable-projection refinement (default 100)")
    p.add_argument("--cycles", type=int, help="rounds of (AM, variable projection); more is slower and better (default 1)")
    p.add_argument("--refine-steps", type=int, help="Adam refinement steps with the real phi (default 0)")
    p.add_argument("--families", help="comma-separated families to fit: gate,up (default) or gate,up,down")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="products that tolerate rounding (W M^T, A^T W, support Grams) in bf16; normal equations and "
                        "codes stay fp32 (default auto: bf16 for large bf16 checkpoints on bf16-capable hardware)")
    p.add_argument("--rank-allocation", choices=RANK_ALLOCATIONS,
                   help="rank per layer: uniform (default) or sensitivity (fit at 1.5x the rank, then give each "
                        "layer the rank its measured error drop per parameter earns, within the same parameters)")
    p.add_argument("--bits", type=int, choices=QUANT_BITS,
                   help="store bank and adapters quantized at this many bits (weight-only, group scales); the "
                        "adapters are refitted to the quantized bank (default: not quantized)")
    p.add_argument("--quant-group", type=int, help="entries per quantization scale with --bits (default 64)")
    p.add_argument("--quant-method", choices=QUANT_METHODS,
                   help="quantizer with --bits: gptq (error feedback, default), rtn or hqq")
    p.add_argument("--residual-bits", type=int, choices=QUANT_BITS,
                   help="with --bits: also store each expert's residual W - W_hat quantized at this many bits (GPTQ "
                        "under the expert's routed Hessian when calibrated, else round to nearest); default: none")
    p.add_argument("--residual-group", type=int,
                   help="entries per quantization scale of the residuals (default 128)")


def build_config(args: argparse.Namespace) -> FitConfig:
    cfg = FitConfig.from_file(args.config) if args.config else FitConfig()
    if args.device is None and not args.config:                   # the command line's default: auto
        from globe.device import resolve_device
        args.device = resolve_device("auto").type
        logging.getLogger("globe").info("device: %s (--device auto: cuda, then mps, then cpu)", args.device,
                                        extra={"hold": True})               # shown once work begins (cli.main)
    b, s, t = cfg.bank, cfg.sparsity, cfg.train
    for obj, attr, value in [(b, "budget", args.budget), (b, "m", args.m), (b, "r", args.r), (b, "init", args.init),
                             (b, "phi", args.phi), (s, "method", args.method), (s, "target_support", args.target_support),
                             (t, "am_iters", args.am_iters), (t, "varpro_steps", args.varpro_steps), (t, "cycles", args.cycles),
                             (t, "refine_steps", args.refine_steps), (t, "device", args.device), (t, "seed", args.seed),
                             (t, "checkpoint_every", args.checkpoint_every),
                             (t, "precision", args.precision), (cfg.ranks, "allocation", args.rank_allocation),
                             (cfg.quant, "bits", getattr(args, "bits", None)),
                             (cfg.quant, "group", getattr(args, "quant_group", None)),
                             (cfg.quant, "method", getattr(args, "quant_method", None)),
                             (cfg.quant, "residual_bits", getattr(args, "residual_bits", None)),
                             (cfg.quant, "residual_group", getattr(args, "residual_group", None))]:
        if value is not None:
            setattr(obj, attr, value)
    a = cfg.activation
    for attr, value in [("stats", args.calibration), ("steps", args.activation_steps)]:
        if value is not None:
            setattr(a, attr, value)
    a.per_expert = a.per_expert and not args.per_layer
    a.routing_weights = a.routing_weights or args.routing_weights
    if (args.per_layer or args.routing_weights) and not a.stats:
        raise ConfigError("--per-layer / --routing-weights need --calibration STATS")
    if args.families:
        b.families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    return cfg.validate()


def fit_run(args: argparse.Namespace) -> FitRun:
    cfg = build_config(args)
    if getattr(args, "total_cut", None) is not None:
        if args.budget is not None:
            raise ConfigError("give --budget (per family) or --total-cut (of all parameters), not both")
        apply_total_cut(cfg, args.model_dir, args.total_cut)
    return FitRun(model_dir=args.model_dir, out=args.out, config=cfg, resume=args.resume,
                  overwrite=args.overwrite, distributed=args.distributed, metrics=args.metrics,
                  wandb=WandbConfig(mode=args.wandb, project=args.wandb_project), config_file=args.config)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:                                       # nothing written
        return dry_run.print_plan(args, build_config(args))
    run_ = fit_run(args)
    result = run_fit(run_)
    if result is None:                                     # not rank 0: rank 0 writes and reports
        return 0
    summary = fit_summary(result)
    print(json_text(summary, indent=2) if args.json else format_fit_summary(summary, run_.out))
    return 0
