"""Self-generated against real calibration text with today's default `globe compress`, and its fit time against
MoBE's recipe, in one run.

Quality. For each model (default: the three evaluation models in benchmarks/models/) and each cut of its TOTAL
parameters (--cuts, default 0.35 0.25 0.40, in that order, each over every model before the next; a pass per
--variants entry, the first at every cut before the next starts, so a run stopped early has it whole), the default
`globe compress MODEL --total-cut C` runs through benchmarks/peers.py's globe-default rows (the command's own parser,
config and globe.run.compress; the fit time covers calibration, the activation-aware fit, the whole-expert phase,
quantization and both exports), once per calibration source (--sources) and factor format (--variants):
  self   calibrated on --calib-tokens tokens the model samples itself (what `globe compress` does by default)
  real   calibrated on the first --calib-tokens tokens of MODEL/calib.txt (`--calibration-text --calibration-mix
         0`; a split disjoint from training and held-out text; --calib: another file)
  mixed  on both: those tokens and --mix x --calib-tokens tokens the model samples itself (`--calibration-text
         --calibration-mix MIX`; the self rows' sample, interleaved by window)
  quant  compress's default factors (4-bit group-64 GPTQ when written); bf16: `--no-quant`; q8: `--bits 8`
Each dense checkpoint is scored as the peers grid scores it (peers.score, peers.py's settings: KL(original ||
compressed) per token, top-1 agreement and perplexity on the first --ppl-tokens held-out tokens; the routed output
error on the --output-tokens calibration tokens after peers.py's 32,768), with each fit's wall and user CPU seconds.

Fit time. At --mobe-cut (default 0.35), after that cut's GloBE rows on the same model: MoBE
(benchmarks/baselines/mobe.py, its defaults) timed at 0 and --mobe-epochs epochs for both families, on the weights
it reads itself (timed too; MoBE needs no statistics). Its recipe (--mobe-recipe-epochs, 30000: the default
`--num_epochs` of inclusionAI/MoBE train.py, full batch) is extrapolated linearly: weights + the 0-epoch run (SVD
initialisation) + recipe epochs x the measured per-epoch cost. Compared in user CPU seconds with the self / quant
row (the default `globe compress`). One thread (torch.set_num_threads(1)); one JSON (--out), rewritten after every
row.

    OMP_NUM_THREADS=1 python benchmarks/self_calibration.py
    python benchmarks/self_calibration.py benchmarks/models/upcycled-qwen2moe --cuts 0.35 --sources self real --no-mobe
    python benchmarks/self_calibration.py --sources real self mixed --variants q8 --no-mobe \
        --out benchmarks/results/self_calibration_mix.json
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from benchmarks.baselines.checkpoint import FAMILIES, load_causal_lm, read_families  # noqa: E402
from benchmarks.baselines.mobe import MobeConfig  # noqa: E402
from benchmarks.report import new_report, quiet_logging  # noqa: E402

log = logging.getLogger("benchmarks.self_calibration")
MODELS = ("benchmarks/models/mixtral-e8-top2", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")
# (variant, source) -> the peers.py globe-default row that runs it; the rows peers.py lacks are registered here
peers.GLOBE_DEFAULTS.setdefault("globe-default-quant-text", ("--calibration-text",))
ROWS = {("quant", "self"): "globe-default-quant", ("quant", "real"): "globe-default-quant-text",
        ("bf16", "self"): "globe-default", ("bf16", "real"): "globe-default-text"}
VARIANT_OPTIONS = {"quant": (), "bf16": ("--no-quant",), "q8": ("--bits=8",)}
SOURCES = ("self", "real", "mixed")


def row_method(variant: str, source: str, mix: float) -> str:
    """The peers.py GLOBE_DEFAULTS name of a (variant, source) row, registered on first use. real passes
    --calibration-mix 0 and mixed --calibration-mix MIX, so that neither depends on compress's default mix (the
    self rows keep peers.py's names; ROWS' real rows, `--calibration-text` alone, are what self_calibration.json
    ran when the text alone was the default)."""
    if (variant, source) in ROWS and source == "self":
        return ROWS[variant, source]
    mix_option = {"self": (), "real": ("--calibration-text", "--calibration-mix=0"),
                  "mixed": ("--calibration-text", f"--calibration-mix={mix:g}")}[source]
    name = f"globe-default-{variant}-{source}" + (f"-{mix:g}" if source == "mixed" else "")
    peers.GLOBE_DEFAULTS.setdefault(name, VARIANT_OPTIONS[variant] + mix_option)
    return name


MOBE_RECIPE_EPOCHS = 30000          # inclusionAI/MoBE train.py --num_epochs default (its Qwen3-235B recipe)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: all three)")
    a("--cuts", type=float, nargs="+", default=[0.35, 0.25, 0.40], help="cuts of TOTAL params, in run order")
    a("--sources", nargs="+", default=["self", "real"], choices=SOURCES, help="calibration sources")
    a("--variants", nargs="+", default=["quant"], choices=tuple(VARIANT_OPTIONS),
      help="factor formats: quant (compress's default bits), bf16 (--no-quant), q8 (--bits 8); default quant")
    a("--mix", type=float, default=1.0,
      help="the mixed source's --calibration-mix: self-generated tokens added, x --calib-tokens (default 1)")
    a("--calib", help="calibration text (default MODEL/calib.txt; peers.py's --calib)")
    a("--text", help="held-out text scored (default MODEL/heldout.txt; peers.py's --text)")
    a("--split-heldout", type=float, metavar="F",
      help="calibrate on MODEL/heldout.txt up to the line end after its first F of characters, score on the rest "
           "(for the embedded model, whose only text beside its training corpus is heldout.txt)")
    a("--calib-tokens", type=int, default=8192, help="calibration tokens, the same for both sources (default 8192)")
    a("--ppl-tokens", type=int, default=8192, help="score the first N held-out tokens (default 8192, the grid's)")
    a("--output-tokens", type=int, default=4096, help="calibration tokens for the output error (peers.py's)")
    a("--mobe-cut", type=float, default=0.35, help="cut at which MoBE's fit is timed (default 0.35)")
    a("--mobe-epochs", type=int, default=200, help="MoBE epochs actually timed (default 200)")
    a("--mobe-recipe-epochs", type=int, default=MOBE_RECIPE_EPOCHS,
      help=f"MoBE epochs extrapolated to (default {MOBE_RECIPE_EPOCHS}, its train.py default)")
    a("--no-mobe", action="store_true", help="skip the MoBE timing")
    a("--out", default=str(REPO / "benchmarks" / "results" / "self_calibration.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.calib_tokens < 1 or args.ppl_tokens < 0 or args.output_tokens < 1 or args.mobe_epochs < 1 \
            or args.mobe_recipe_epochs < args.mobe_epochs:
        p.error("--calib-tokens, --output-tokens and --mobe-epochs must be >= 1, --ppl-tokens >= 0, "
                "--mobe-recipe-epochs >= --mobe-epochs")
    if args.split_heldout is not None and (not 0 < args.split_heldout < 1 or args.calib or args.text):
        p.error("--split-heldout must lie in (0, 1), without --calib / --text")
    if not args.mix >= 0:
        p.error("--mix must be >= 0")
    if any(not 0 < c < 1 for c in args.cuts + [args.mobe_cut]):
        p.error("--cuts and --mobe-cut must lie in (0, 1)")
    return args


class Clock:
    """Wall and user / system CPU seconds of this process (and its children) since creation."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime

    def stop(self) -> dict:
        now = self._now()
        return {k: round(b - a, 2) for k, a, b in zip(("wall_s", "user_s", "sys_s"), self.start, now)}


def split_heldout(model_dir: Path, share: float, work: Path) -> tuple[str, str]:
    """(calibration file, scored file): MODEL/heldout.txt cut at the first line end after `share` of it."""
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    cut = text.index("\n", int(len(text) * share)) + 1
    calib, scored = work / f"{model_dir.name}_calib.txt", work / f"{model_dir.name}_scored.txt"
    calib.write_text(text[:cut], encoding="utf-8")
    scored.write_text(text[cut:], encoding="utf-8")
    return str(calib), str(scored)


def context(model_dir: Path, args) -> dict:
    """peers.prepare at peers.py's settings (its calibration statistics only feed the output error's split)."""
    if args.split_heldout is not None:
        work = Path(tempfile.mkdtemp(prefix="self-calibration-split-"))
        args = argparse.Namespace(**{**vars(args), **dict(zip(("calib", "text"), split_heldout(
            model_dir, args.split_heldout, work)))})
    argv = [str(model_dir), "--methods", "globe-default-quant", "--ppl-tokens", str(args.ppl_tokens),
            "--output-tokens", str(args.output_tokens), "--default-calib-tokens", str(args.calib_tokens)]
    for flag, value in (("--calib", args.calib), ("--text", args.text)):
        argv += [flag, value] if value else []
    return peers.prepare(model_dir, peers.parse_args(argv))


def globe_row(ctx: dict, cut: float, variant: str, source: str, mix: float = 1.0) -> dict:
    """The default `globe compress` (one variant, one source) at `cut`, scored as the peers grid scores it."""
    from globe.fit.planning.bytes import result_bytes
    method = row_method(variant, source, mix)
    ctx["cut"] = cut
    with tempfile.TemporaryDirectory(prefix="self-calibration-") as tmp:
        clock = Clock()
        result, dense = peers.globe_compress(method, ctx, cut, Path(tmp))
        fit = clock.stop()
        scored = peers.score(ctx, dense)
    stored = result_bytes(result)
    row = {"variant": variant, "source": source, "method": method, "kl": scored["kl"], "top1": scored["top1"],
           "perplexity": scored["perplexity"], "delta_ppl": scored["perplexity"] - ctx["original_ppl"],
           "rel_err": scored["rel_err"], "output_rel_err": scored["output_rel_err"], "fit": fit,
           "calibration": result.source.get("calibration"),
           "params": {f: int(result.params[f]) for f in FAMILIES},
           "bytes": {f: int(stored["families"][f]["stored"]) for f in FAMILIES},
           "shape": {f: {"m": fam.shape["m"], "r": fam.shape["r"], "median_support": fam.metrics.get("median_support")}
                     for f, fam in result.families.items()}}
    log.info("%s -%.0f%% %s/%s: KL %.5f, top-1 %.4f, ppl %.3f; fit %.0f s wall, %.0f s user CPU", ctx["dir"].name,
             100 * cut, variant, source, row["kl"], row["top1"], row["perplexity"], fit["wall_s"], fit["user_s"])
    return row


def mobe_timing(ctx: dict, cut: float, args) -> dict:
    """MoBE's fit of both families at `cut` timed at 0 and --mobe-epochs epochs, extrapolated to its recipe."""
    from globe.fit.solvers.budget import total_cut_budget
    budget, _ = total_cut_budget(cut, ctx["inv"], FAMILIES)
    clock = Clock()
    weights = read_families(load_causal_lm(ctx["dir"]))                 # what MoBE reads: the routed gate / up
    read = clock.stop()
    runs = {}
    for epochs in (0, args.mobe_epochs):
        clock = Clock()
        fits = peers.baseline("mobe", {**ctx, "weights": weights}, budget, MobeConfig(epochs=epochs))
        runs[epochs] = clock.stop()
    per_epoch = {k: (runs[args.mobe_epochs][k] - runs[0][k]) / args.mobe_epochs for k in ("wall_s", "user_s")}
    recipe = {k: round(read[k] + runs[0][k] + args.mobe_recipe_epochs * per_epoch[k], 1) for k in ("wall_s", "user_s")}
    out = {"cut": cut, "budget_per_family": budget, "r": fits["gate"].info["r"], "m": fits["gate"].info["m"],
           "read_weights": read, "init_only": runs[0], "timed_epochs": args.mobe_epochs,
           "timed": runs[args.mobe_epochs], "per_epoch": {k: round(v, 5) for k, v in per_epoch.items()},
           "recipe_epochs": args.mobe_recipe_epochs, "recipe_extrapolated": recipe}
    log.info("%s -%.0f%% MoBE: %.4f s user CPU per epoch; %d epochs extrapolated: %.0f s user CPU", ctx["dir"].name,
             100 * cut, per_epoch["user_s"], args.mobe_recipe_epochs, recipe["user_s"])
    return out


def fit_time(entry: dict, mobe_cut: float) -> dict | None:
    """GloBE default (quant, self) against MoBE's recipe, user CPU seconds, at mobe_cut; None until both ran."""
    mobe = entry.get("mobe")
    rows = [r for c in entry["cuts"] if c["cut"] == mobe_cut for r in c["rows"]
            if (r["variant"], r["source"]) == ("quant", "self")]
    if mobe is None or not rows:
        return None
    globe_s, mobe_s = rows[0]["fit"]["user_s"], mobe["recipe_extrapolated"]["user_s"]
    return {"globe_default_user_s": globe_s, "mobe_recipe_user_s": mobe_s, "ratio": round(globe_s / mobe_s, 3),
            "goal_met": globe_s <= mobe_s}


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    from globe.fit.solvers.budget import total_cut_budget
    args = parse_args(argv)
    torch.set_num_threads(1)
    quiet_logging()
    t0 = time.perf_counter()
    report = new_report(args, ("out", "models"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:                                                   # partial results survive
        report["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out, json.dumps(report, indent=1, default=float))

    ctxs = []
    for model_dir in args.models:
        ctx = context(Path(model_dir).resolve(), args)
        ctxs.append(ctx)
        info = ctx["info"]
        report["models"].append({"model": {**info, "dir": Path(info["dir"]).name}, "cuts": []})
        save()
    for variant in args.variants:                     # a pass per variant: the first one at every cut first
        for cut in args.cuts:
            for ctx, entry in zip(ctxs, report["models"]):
                done = next((c for c in entry["cuts"] if c["cut"] == cut), None)
                if done is None:
                    budget, support = total_cut_budget(cut, ctx["inv"], FAMILIES)
                    done = {"cut": cut, "budget_per_family": budget, "target_support": support, "rows": []}
                    entry["cuts"].append(done)
                for source in args.sources:
                    done["rows"].append(globe_row(ctx, cut, variant, source, args.mix))
                    save()
                if cut == args.mobe_cut and variant == "quant" and not args.no_mobe:
                    entry["mobe"] = mobe_timing(ctx, cut, args)
                    entry["fit_time"] = fit_time(entry, args.mobe_cut)
                    save()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("| model | cut | variant | KL self / real / mixed | real / self | mixed / self | top-1 self / real / mixed |")
    print("|---|---|---|---|---|---|---|")
    for entry in report["models"]:
        for c in entry["cuts"]:
            by = {(r["variant"], r["source"]): r for r in c["rows"]}
            for variant in dict.fromkeys(v for v, _ in by):
                rows = [by.get((variant, source)) for source in SOURCES]
                if rows[0] is None:
                    continue
                kl = " / ".join(f"{r['kl']:.5f}" if r else "-" for r in rows)
                top1 = " / ".join(f"{r['top1']:.4f}" if r else "-" for r in rows)
                ratio = [f"{r['kl'] / rows[0]['kl']:.2f}" if r else "-" for r in rows[1:]]
                print(f"| {entry['model']['dir']} | -{100 * c['cut']:.0f} % | {variant} | {kl} | {ratio[0]} | "
                      f"{ratio[1]} | {top1} |")
    print("\n| model | GloBE default: user CPU s | MoBE recipe (extrapolated): user CPU s | ratio | goal |")
    print("|---|---|---|---|---|")
    for entry in report["models"]:
        t = entry.get("fit_time")
        if t:
            print(f"| {entry['model']['dir']} | {t['globe_default_user_s']:.0f} | {t['mobe_recipe_user_s']:.0f} | "
                  f"{t['ratio']:.2f} | {'met' if t['goal_met'] else 'missed'} |")


if __name__ == "__main__":
    main()
