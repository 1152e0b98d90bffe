"""`globe fit`: fit the gate/up (optionally down) banks of a checkpoint and write OUT/banks.safetensors +
OUT/globe_config.json; with --calibration STATS the fit minimises the activation-weighted error."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from globe.artifact import BANKS_FILE, save
from globe.assets import DEFAULT_MODEL_DIR
from globe.errors import ArtifactError, ConfigError
from globe.fit.config import CODERS, INITS, PHIS, FitConfig

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit global banks for the routed experts' gate/up projections",
                       description="Fit one shared bank per family (gate, up) over all layers' routed experts.")
    p.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR),
                   help="checkpoint directory (config.json + *.safetensors); default: the embedded tiny model")
    p.add_argument("-o", "--out", required=True, help="output directory for the artifact")
    p.add_argument("--config", help="fit config file (JSON or YAML, as written into globe_config.json)")
    p.add_argument("--budget", type=float, help="stored params / dense params per family, in (0, 1) (default 0.5)")
    p.add_argument("--m", type=int, help="number of atoms per bank (default: chosen from --budget)")
    p.add_argument("--r", type=int, help="adapter rank = rows of an atom (default: chosen from --budget)")
    p.add_argument("--target-support", type=int, help="target median number of atoms per expert (default 12)")
    p.add_argument("--init", choices=INITS, help="warm start (default hybrid)")
    p.add_argument("--phi", choices=PHIS, help="nonlinearity applied to mixed atoms (default identity)")
    p.add_argument("--method", choices=CODERS, help="sparse mapping of the codes (default entmax15)")
    p.add_argument("--am-iters", type=int, help="alternating-minimisation iterations (default 30)")
    p.add_argument("--varpro-steps", type=int, help="L-BFGS evaluations of the variable-projection refinement")
    p.add_argument("--cycles", type=int, help="rounds of (AM, variable projection); more is slower and better (default 1)")
    p.add_argument("--refine-steps", type=int, help="Adam refinement steps with the real phi (default 0)")
    p.add_argument("--families", help="comma-separated families to fit: gate,up (default) or gate,up,down")
    p.add_argument("--calibration", metavar="STATS",
                   help="activation statistics from `globe calibrate`: fit the activation-weighted error "
                        "||(W - W_hat) C^1/2|| instead of the plain weight error")
    p.add_argument("--per-layer", action="store_true",
                   help="with --calibration: one C per MoE layer instead of each expert's C from its routed tokens")
    p.add_argument("--routing-weights", action="store_true",
                   help="with --calibration: weight each expert's error by its routing frequency")
    p.add_argument("--activation-steps", type=int,
                   help="L-BFGS evaluations of the activation-aware refinement (default 100)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="compute device (default cpu)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="reuse families finished by an interrupted run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact in OUT")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> FitConfig:
    cfg = FitConfig.from_file(args.config) if args.config else FitConfig()
    b, s, t = cfg.bank, cfg.sparsity, cfg.train
    for obj, attr, value in [(b, "budget", args.budget), (b, "m", args.m), (b, "r", args.r), (b, "init", args.init),
                             (b, "phi", args.phi), (s, "method", args.method), (s, "target_support", args.target_support),
                             (t, "am_iters", args.am_iters), (t, "varpro_steps", args.varpro_steps), (t, "cycles", args.cycles),
                             (t, "refine_steps", args.refine_steps), (t, "device", args.device), (t, "seed", args.seed)]:
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


def run(args: argparse.Namespace) -> int:
    from globe import checkpoint
    from globe.fit.engine import fit_model
    cfg = build_config(args)
    out = Path(args.out)
    if (out / BANKS_FILE).exists() and not (args.overwrite or args.resume):
        raise ArtifactError(f"{out} already holds an artifact: pass --overwrite to replace it or choose another -o")
    done = checkpoint.load_families(out, cfg, args.model_dir) if args.resume else {}
    result = fit_model(args.model_dir, cfg, done=done,
                       on_family=lambda fam: checkpoint.save_family(out, fam, cfg, args.model_dir))
    save(result, out)
    checkpoint.clear(out)
    summary = {name: {k: fam.metrics[k] for k in ("rel_err", "energy_captured", "median_support", "seconds")}
               | {"m": fam.shape["m"], "r": fam.shape["r"],
                  "params_ratio": fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"]}
               | {k: fam.metrics[k] for k in ("act_rel_err",) if k in fam.metrics}
               for name, fam in result.families.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'family':8} {'m':>5} {'r':>5} {'params':>8} {'rel_err':>9} {'energy':>8} {'support':>8} {'time s':>7}")
        for name, row in summary.items():
            print(f"{name:8} {row['m']:5d} {row['r']:5d} {row['params_ratio']:8.3f} {row['rel_err']:9.4f} "
                  f"{row['energy_captured']:8.4f} {row['median_support']:8.1f} {row['seconds']:7.1f}")
            if "act_rel_err" in row:
                print(f"{'':8} activation-weighted rel_err {row['act_rel_err']:.4f}")
        print(f"artifact written to {out}")
    return 0
