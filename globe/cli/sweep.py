"""`globe sweep [MODEL_DIR] -o SWEEP.json [--budgets B ...]`: GloBE and per-expert SVD at several parameter budgets,
the JSON `globe eval --globe OUT --plots DIR --sweep SWEEP.json` draws as error vs budget (globe.eval.sweep).

Each budget is one full GloBE fit per family (and per --inits warm start), so a sweep takes about
len(budgets) x len(inits) times a `globe fit`. The file names the checkpoint by its routed experts' content hash:
the plots refuse a sweep of other weights than the artifact's.
"""
from __future__ import annotations

import argparse

from globe.assets import DEFAULT_MODEL_DIR
from globe.eval.sweep import SweepSettings, make_sweep
from globe.fit.config import INITS

DEFAULTS = SweepSettings()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="GloBE vs per-expert SVD at several budgets: the JSON of eval --sweep",
                       description="Fit GloBE and per-expert truncated SVD to the routed experts at several parameter "
                                   "budgets and write their relative errors as JSON, for `globe eval --plots DIR "
                                   "--sweep JSON` (error_vs_budget.png). One GloBE fit per budget, family and warm "
                                   "start.")
    a = p.add_argument
    a("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), metavar="MODEL_DIR",
      help="checkpoint directory or hub id (default: the embedded model)")
    a("-o", "--out", required=True, metavar="JSON", help="sweep JSON to write")
    a("--budgets", type=float, nargs="+", default=list(DEFAULTS.budgets), metavar="B",
      help=f"stored / dense params per family (default {' '.join(map(str, DEFAULTS.budgets))})")
    a("--families", nargs="+", default=list(DEFAULTS.families), choices=("gate", "up", "down"),
      help="families to fit (default gate up)")
    a("--inits", nargs="+", default=list(DEFAULTS.inits), choices=INITS,
      help=f"GloBE warm starts, the best of each budget is plotted (default {' '.join(DEFAULTS.inits)})")
    a("--target-support", type=int, default=DEFAULTS.target_support,
      help=f"GloBE target median support (default {DEFAULTS.target_support})")
    a("--am-iters", type=int, default=DEFAULTS.am_iters, help=f"AM iterations (default {DEFAULTS.am_iters})")
    a("--varpro-steps", type=int, default=DEFAULTS.varpro_steps,
      help=f"variable-projection L-BFGS evaluations (default {DEFAULTS.varpro_steps})")
    a("--seed", type=int, default=DEFAULTS.seed, help=f"seed of every fit (default {DEFAULTS.seed})")
    a("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = SweepSettings(budgets=tuple(args.budgets), families=tuple(args.families), inits=tuple(args.inits),
                             target_support=args.target_support, am_iters=args.am_iters,
                             varpro_steps=args.varpro_steps, seed=args.seed)
    make_sweep(args.model_dir, args.out, settings, args.overwrite)
    print(f"wrote {args.out}: plot it with `globe eval --globe OUT --plots DIR --sweep {args.out}`")
    return 0
