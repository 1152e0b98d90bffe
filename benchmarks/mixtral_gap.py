"""Why GloBE only ties per-expert whitened SVD (SVD-LLM) on mixtral-e8-top2: a diagnosis, KL first.

At one total cut (default -35 % of all params), self-calibrated and unquantized (`globe compress --total-cut C
--no-quant`, what the peers benchmark's globe-default row runs), on the model's held-out text (KL(original ||
compressed) per token in nats, top-1 agreement, perplexity; globe.eval.divergence):

- default: the shape (m, r, median support) the default picks, its KL, per-family weight / activation errors;
- per layer: the default's compressed experts in one layer only put back to the original (KL that layer carries),
  and per family: only gate or only up compressed;
- shapes: an oracle sweep of a few (m, r) at the same per-family parameter count (r solved from m and the budget);
- down: gate, up and down compressed at the same total cut (the cut spread over three families);
- per-layer banks: each MoE layer fitted on its own (one bank per layer, m split evenly, the same total params);
- down elsewhere (part down_models, not in the default parts): gate+up against gate+up+down at the same total cut
  on the other models (the embedded tuning model first), unquantized and with the 4-bit default (--bits).

One JSON (--out), rewritten after every row; fits are kept in --work.

    OMP_NUM_THREADS=1 python benchmarks/mixtral_gap.py                     # ~10 min single-threaded
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

log = logging.getLogger("benchmarks.mixtral_gap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=str(REPO / "benchmarks/models/mixtral-e8-top2"), help="model directory")
    a("--cut", type=float, default=0.35, help="cut of TOTAL params (default 0.35)")
    a("--eval-tokens", type=int, default=16384, help="held-out tokens scored (default 16384, as peers.py)")
    a("--atoms", type=int, nargs="*", default=[4, 8, 16], help="oracle sweep: bank sizes m (r from the budget)")
    a("--parts", nargs="+", default=["default", "layers", "shapes", "down", "per_layer"],
      help="what to run (default: all)")
    a("--models", nargs="*", default=["globe/assets/globe-tiny-moe", "benchmarks/models/upcycled-qwen2moe",
                                      "benchmarks/models/scratch-qwen2moe-e48"], help="part down_models: the models")
    a("--bits", nargs="+", default=["none", "4"], help="part down_models: quantization (none, or bits)")
    a("--work", default=str(REPO / "runs" / "mixtral-gap"), help="fits kept here")
    a("--out", default=str(REPO / "benchmarks" / "results" / "mixtral_gap.json"), help="JSON output path")
    return p.parse_args(argv)


class Context:
    """The original model (fp32), its held-out ids, and scoring of a model against it."""

    def __init__(self, args) -> None:
        from globe.eval import encode_text
        from globe.export import load_model
        from globe.run.tokenizer import load_tokenizer
        self.args, self.model_dir = args, Path(args.model)
        self.original = load_model(str(self.model_dir), torch.float32)
        text = (self.model_dir / "heldout.txt").read_text(encoding="utf-8")
        self.ids = encode_text(load_tokenizer(str(self.model_dir)), text)[:args.eval_tokens]

    def score(self, model) -> dict:
        from globe.eval import divergence
        div = divergence(self.original, model, self.ids, 256)
        return {"kl": div["kl"], "top1": div["top1"], "perplexity": div["perplexity"]}


def compress(ctx: Context, name: str, cfg, cut: float | None) -> tuple[dict, object]:
    """globe compress (unquantized, self-calibrated) into WORK/name; (row, dense model fp32)."""
    from globe.export import load_model
    from globe.run.compress import CompressRun, run_compress
    work = Path(ctx.args.work) / name
    t0 = time.perf_counter()
    done = run_compress(CompressRun(str(ctx.model_dir), str(work), cfg, total_cut=cut, dense=True,
                                    dense_out=str(work) + "-dense", overwrite=True))
    seconds = time.perf_counter() - t0
    model = load_model(done["dense"], torch.float32)
    result = done["result"]
    row = {"name": name, "seconds": round(seconds, 1), **ctx.score(model),
           "families": {f: {"shape": fam.shape, "median_support": fam.metrics.get("median_support"),
                            "rel_err": fam.metrics.get("rel_err"), "act_rel_err": fam.metrics.get("act_rel_err"),
                            "stored": fam.metrics["params"]["stored"], "dense": fam.metrics["params"]["dense"]}
                        for f, fam in result.families.items()}}
    return row, model


def swapped(ctx: Context, model, layers: list[int], families: tuple[str, ...]):
    """A copy of `model` whose experts in `layers` have the original's weights for `families`."""
    from globe.io.model import experts_modules, model_arch
    out = copy.deepcopy(model)
    layout = model_arch(out)[0].layout
    mods, orig = experts_modules(out), experts_modules(ctx.original)
    for layer in layers:
        layout.set_weights(mods[layer], {f: layout.weight(orig[layer], f).detach() for f in families})
    return out


def default_cfg():
    import globe
    cfg = globe.FitConfig()
    cfg.quant.bits = None
    return cfg


def solved_rank(m: int, budget: float, n: int, p: int, d: int, support: int) -> int:
    """The largest r with m r d + n p r + n support <= budget n p d."""
    return int((budget * n * p * d - n * support) // (m * d + n * p))


def run_default(ctx: Context, report: dict, save) -> object:
    row, model = compress(ctx, "default", default_cfg(), ctx.args.cut)
    report["default"] = row
    save()
    return model


def run_layers(ctx: Context, report: dict, save, model) -> None:
    from globe.io.model import experts_modules
    layers = sorted(experts_modules(model))
    rows = []
    for layer in layers:
        kl = ctx.score(swapped(ctx, model, [layer], ("gate", "up")))
        rows.append({"layer": layer, "kl_with_layer_restored": kl["kl"],
                     "kl_carried": report["default"]["kl"] - kl["kl"]})
        report["per_layer_restored"] = rows
        save()
    report["per_family"] = {f"only_{keep}_compressed": ctx.score(swapped(ctx, model, layers, (other,)))
                            for keep, other in (("gate", "up"), ("up", "gate"))}
    save()


def run_shapes(ctx: Context, report: dict, save) -> None:
    from globe.io import open_checkpoint
    from globe.run.fit import apply_total_cut
    base = apply_total_cut(default_cfg(), str(ctx.model_dir), ctx.args.cut)
    with open_checkpoint(str(ctx.model_dir)) as reader:
        inv = reader.inventory()
    n = len(inv.moe_layers) * inv.num_experts
    rows = []
    for m in ctx.args.atoms:
        cfg = default_cfg()
        support = min(base.sparsity.target_support, max(1, m // 2))
        r = solved_rank(m, base.bank.budget, n, inv.p, inv.d, support)
        cfg.bank.m, cfg.bank.r, cfg.sparsity.target_support = m, min(r, inv.p, inv.d), support
        row, _ = compress(ctx, f"shape_m{m}", cfg, None)
        rows.append({"m": m, "r": cfg.bank.r, "target_support": support, **row})
        report["shapes"] = rows
        save()


def run_down(ctx: Context, report: dict, save) -> None:
    cfg = default_cfg()
    cfg.bank.families = ("gate", "up", "down")
    report["with_down"], _ = compress(ctx, "with_down", cfg, ctx.args.cut)
    save()


def run_per_layer(ctx: Context, report: dict, save) -> None:
    """One bank per MoE layer: every layer's experts fitted alone (their own budget solver, the default's
    per-family budget), the families assembled into one dense model and scored."""
    from globe.calibration import load_stats
    from globe.export import load_model
    from globe.fit.engine.family import fit_family
    from globe.fit.objectives.activation import ActivationObjective
    from globe.io import open_checkpoint
    from globe.io.model import experts_modules, model_arch
    from globe.run.calibrate import CalibrateRun, run_calibrate_with_ids
    from globe.run.fit import apply_total_cut
    work = Path(ctx.args.work) / "per_layer"
    work.mkdir(parents=True, exist_ok=True)
    cfg = apply_total_cut(default_cfg(), str(ctx.model_dir), ctx.args.cut)
    stats_path = work / "calibration.safetensors"
    run_calibrate_with_ids(CalibrateRun(str(ctx.model_dir), None, str(stats_path), max_tokens=8192, overwrite=True))
    stats = load_stats(stats_path)
    cfg.activation.stats = str(stats_path)
    model = load_model(str(ctx.model_dir), torch.float32)
    layout = model_arch(model)[0].layout
    mods = experts_modules(model)
    t0, shapes, stored = time.perf_counter(), {}, 0
    with open_checkpoint(str(ctx.model_dir)) as reader:
        for k, family in enumerate(("gate", "up")):
            stack = reader.read_family(family)
            for layer in sorted(mods):
                rows = (stack.ids[:, 0] == layer).nonzero().flatten()
                sub = dataclasses.replace(stack, weights=stack.weights[rows].clone(), ids=stack.ids[rows].clone())
                objective = ActivationObjective.for_family(stats, family, sub, cfg)
                fam = fit_family(sub.weights, sub.ids, cfg, family, torch.Generator().manual_seed(k), None, None,
                                 objective=objective)
                shapes.setdefault(family, []).append({"layer": layer, **fam.shape,
                                                      "median_support": fam.metrics.get("median_support")})
                stored += fam.metrics["params"]["stored"]
                layout.set_weights(mods[layer], {family: fam.reconstruct().to(layout.dtype(mods[layer]))})
    report["per_layer_banks"] = {"seconds": round(time.perf_counter() - t0, 1), "stored_params": stored,
                                 "shapes": shapes, **ctx.score(model)}
    save()


def run_down_models(args, report: dict, save) -> None:
    """gate+up vs gate+up+down at the same total cut on other models, each scored on its own held-out text."""
    from globe.export import load_model
    rows = report.setdefault("down_models", [])
    for model in args.models:
        ctx = Context(argparse.Namespace(**{**vars(args), "model": str(REPO / model)}))
        for bits in args.bits:
            for families in (("gate", "up"), ("gate", "up", "down")):
                cfg = default_cfg()
                cfg.quant.bits = None if bits == "none" else int(bits)
                cfg.bank.families = families
                name = f"{Path(model).name}_{'+'.join(families)}_{bits}"
                row, _ = compress(ctx, name, cfg, args.cut)
                rows.append({"model": model, "bits": cfg.quant.bits, "families": list(families), **row})
                save()
        del ctx


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_logging()
    torch.manual_seed(0)
    out = Path(args.out)
    report = new_report(args)
    if out.is_file():                                   # parts run later add to the earlier ones
        settings = report["settings"]
        report = json.loads(out.read_text())
        report.setdefault("later_runs", []).append(settings)
    ctx = Context(args) if set(args.parts) - {"down_models"} else None

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    model = None
    if "default" in args.parts or "layers" in args.parts:
        model = run_default(ctx, report, save)
    if "layers" in args.parts:
        run_layers(ctx, report, save, model)
    if "shapes" in args.parts:
        run_shapes(ctx, report, save)
    if "down" in args.parts:
        run_down(ctx, report, save)
    if "per_layer" in args.parts:
        run_per_layer(ctx, report, save)
    if "down_models" in args.parts:
        run_down_models(args, report, save)
    save()
    return report


if __name__ == "__main__":
    main()
