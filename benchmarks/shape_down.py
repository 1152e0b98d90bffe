"""The sparsity-aware shape guard and down in the default families, KL first (issue 22).

At one total cut (default -35 % of all params), self-calibrated (`globe compress --total-cut C`, the product path,
unquantized by default as the mixtral gap diagnosis), each model scored on its own held-out text against the
original (KL(original || compressed) per token in nats, top-1 agreement, perplexity; globe.eval.divergence):

- gate+up: the default families, with the bank shape the budget solver picks now (at most 2 x support atoms,
  globe.fit.solvers.budget.shared_shapes);
- gate+up unguarded (--unguarded MODEL...): the same with the guard off (the solver's earlier candidate set), only
  on the models where the guard changes the shape (a dry run tells: `globe compress MODEL -o X --total-cut C
  --dry-run`);
- gate+up+down: the cut spread over three families (globe.fit.solvers.budget.total_cut_budget).

The embedded model (the tuning model) comes first; the evaluation models are reported without retuning. One JSON
(--out), rewritten after every row; fits are kept in --work.

    OMP_NUM_THREADS=1 python benchmarks/shape_down.py                      # ~15 min single-threaded
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mixtral_gap import Context, compress, default_cfg  # noqa: E402
from benchmarks.report import new_report, quiet_logging  # noqa: E402

log = logging.getLogger("benchmarks.shape_down")

MODELS = ["globe/assets/globe-tiny-moe", "benchmarks/models/mixtral-e8-top2", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", nargs="+", default=MODELS, help="model directories (the embedded tuning model first)")
    a("--cut", type=float, default=0.35, help="cut of TOTAL params (default 0.35)")
    a("--bits", default="none", help="none (unquantized, default) or the bits of the factors")
    a("--eval-tokens", type=int, default=16384, help="held-out tokens scored (default 16384, as peers.py)")
    a("--unguarded", nargs="*", default=["mixtral-e8-top2"],
      help="model names (directory names) that also get the gate+up fit with the shape guard off")
    a("--rows", nargs="+", default=["gate+up", "gate+up+down"], help="which family sets to run")
    a("--work", default=str(REPO / "runs" / "shape-down"), help="fits kept here")
    a("--out", default=str(REPO / "benchmarks" / "results" / "shape_down.json"), help="JSON output path")
    return p.parse_args(argv)


def run_row(ctx: Context, model: str, families: tuple[str, ...], bits: int | None, guard: bool) -> dict:
    """One `globe compress` at the cut with these families; the guard off sets k so large that no shape is capped."""
    from globe.fit.solvers import budget
    cfg = default_cfg()
    cfg.quant.bits = bits
    cfg.bank.families = families
    name = f"{Path(model).name}_{'+'.join(families)}{'' if guard else '_unguarded'}"
    k = budget.SHARED_ATOMS_PER_SUPPORT
    try:
        if not guard:
            budget.SHARED_ATOMS_PER_SUPPORT = 10 ** 9
        row, _ = compress(ctx, name, cfg, ctx.args.cut)
    finally:
        budget.SHARED_ATOMS_PER_SUPPORT = k
    return {"model": model, "families": list(families), "guard": guard, "bits": bits, **row}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_logging()
    torch.manual_seed(0)
    out, report = Path(args.out), new_report(args)
    rows = report.setdefault("rows", [])
    bits = None if args.bits == "none" else int(args.bits)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    for model in args.models:
        ctx = Context(argparse.Namespace(**{**vars(args), "model": str(REPO / model)}))
        for fams in args.rows:
            families = tuple(fams.split("+"))
            guards = (True, False) if families == ("gate", "up") and Path(model).name in args.unguarded else (True,)
            for guard in guards:
                rows.append(run_row(ctx, model, families, bits, guard))
                r = rows[-1]
                log.info("%s %s guard=%s: KL %.5f top1 %.4f (%.0f s) shapes %s", Path(model).name, fams, guard,
                         r["kl"], r["top1"], r["seconds"],
                         {f: (v["shape"]["m"], v["shape"]["r"], v["median_support"]) for f, v in r["families"].items()})
                save()
        del ctx
    save()
    return report


if __name__ == "__main__":
    main()
