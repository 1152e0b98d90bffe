"""`--dry-run` of `globe fit` (and `globe compress`): plan the fit at the shape it will choose, print the plan
(a table, or JSON with --json) and write nothing."""
from __future__ import annotations

import argparse
import json

from globe.fit.config import FitConfig


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print, for the (m, r) the fit will use (given, or chosen by the fit's budget solver: the "
                        "experts are then read and their spectra computed), the stored params and bytes and the "
                        "predicted peak memory and time of every phase on this device (times from a few-second "
                        "kernel benchmark); writes nothing")


def print_plan(args: argparse.Namespace, cfg: FitConfig) -> int:
    """Print the plan of fitting args.model_dir with cfg; exit status 0 (warnings are printed, not fatal)."""
    from globe.fit.planning.plan import plan_fit
    plan = plan_fit(args.model_dir, cfg, out=getattr(args, "out", None))
    print(json.dumps(plan.to_dict(), indent=2) if getattr(args, "json", False) else plan.table())
    return 0
