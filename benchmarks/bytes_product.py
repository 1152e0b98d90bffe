"""The product path against GPTQ at equal bytes: `globe compress --size` (its config: globe.cli.compress; every kind
of family that fits the size, globe.fit.planning.bytes.size_plans: factors only, plain quantization of the experts;
each fitted and the one with the lowest KL on held-out calibration tokens kept, globe.run.size_choice) at ~2.5,
3.0, 3.5, 4.0 and 4.6 bits per routed gate/up weight, fitted activation-aware on the model's calib.txt (its first
--calib-tokens tokens; the kind is chosen on the calib.txt tokens after them, as `globe compress
--calibration-text calib.txt` does) and scored by KL(original || compressed) on heldout.txt (benchmarks/bytes.py's
split, statistics and scoring), against per-expert GPTQ (routed Hessians) at 2, 3, 4 bits and groups 32 / 64 / 128:
for each size, the best GPTQ row within the size. Every candidate is scored on heldout.txt too (was the choice
right?); every kept row and GPTQ row also gets its perplexity of heldout.txt (from the same forward passes), and each
model the original's. The sizes are passed to --size exactly (the bytes / 2**30), so a size that is exactly a GPTQ
row's bytes fits plain quantization at that row's bits and group.

The product's weights are the fit's reconstruction W_hat_i + dequant(R_i) (FamilyFit.reconstruct, what every runtime
mode and the dense export compute: tests/export/test_residual.py); the bytes are the byte model's count of what the
compressed checkpoint stores for gate + up (globe.fit.planning.bytes.result_bytes, equal to the written tensors).
Not run here: the distillation `globe compress` runs after the fit by default (--distill-steps 0 is this path).

--bf16 adds two unquantized baselines at every size, scored the same way: bf16 GloBE (`globe compress --size S
--no-quant` through the same parser, config, statistics and whole-expert phase as the product row; its bytes by the
byte model, checked against the size; where the command refuses --no-quant because plain quantization is the rule
there, the refusal is recorded and the factors-only plan is forced, apply_size(kind="factors")), and MoBE at its
best (benchmarks/baselines/mobe.py; benchmarks/peers.py's sweep: its defaults, m=E/8 and lr=0.02 at --mobe-epochs,
the best by MoBE's own objective, the summed squared relative weight error) at the largest per-family parameter
budget whose stored params x the model's bytes per value (2: bf16, as peers.py counts them) fit the same gate + up
bytes. Each size's "bf16_comparison" gives their KL ratios to the product row and to the best quantizer within the
size. --reuse JSON takes the rows this run does not make (GPTQ when --quantizers lacks it, RTN / HQQ, the product
rows with --no-product, pruning) from an earlier run on the same models and settings.

    OMP_NUM_THREADS=1 python benchmarks/bytes_product.py          # the three evaluation models -> bytes_product.json
    OMP_NUM_THREADS=1 python benchmarks/bytes_product.py --bf16 --no-product --quantizers gptq \
        --reuse benchmarks/results/bytes_product.json --out benchmarks/results/bytes_bf16.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.baselines.checkpoint import FAMILIES, set_families  # noqa: E402
from benchmarks.baselines.common import by_layer  # noqa: E402
from benchmarks.baselines.quant import quantized  # noqa: E402
from benchmarks.bytes import prepare  # noqa: E402
from globe.quant import QuantConfig  # noqa: E402

log = logging.getLogger("benchmarks.bytes_product")
MODELS = ("benchmarks/models/mixtral-e8-top2", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")
SIZES = (2.5, 3.0, 3.5, 4.0, 4.6)
QUANTIZERS = ("gptq", "rtn", "hqq")
PRUNE_KEEP = (0.75, 0.5, 0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: the three "
      "evaluation models)")
    a("--sizes", type=float, nargs="+", default=list(SIZES), help="bits per routed gate/up weight")
    a("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    a("--kl-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    a("--window", type=int, default=256, help="window of calibration and scoring (default 256)")
    a("--stats-dir", default=str(REPO / "runs" / "bytes"), help="calibration statistics files (reused)")
    a("--expert-steps", type=int, help="whole-expert phase steps of the factors candidate (default: what "
      "`globe compress` runs, COMPRESS_STEPS where it applies; 0: off)")
    a("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS),
      help="quantizers scored at every bits / group on the same tensors (default: gptq rtn hqq; without gptq, its "
      "rows come from --reuse)")
    a("--pruning", action="store_true", help="also REAP expert pruning alone (bf16) and stacked with GPTQ of the "
      "kept experts, at --prune-keep fractions of the experts")
    a("--prune-keep", type=float, nargs="+", default=list(PRUNE_KEEP), help="fractions of experts REAP keeps per "
      "layer (default 0.75 0.5 0.25)")
    a("--no-product", action="store_true", help="only the baselines (quantizers, --pruning): no `globe compress "
      "--size` fit")
    a("--bf16", action="store_true", help="also bf16 GloBE (`globe compress --size S --no-quant`) and MoBE at its "
      "best (its sweep) at the same gate/up bytes, at every size")
    a("--mobe-epochs", type=int, default=500, help="--bf16: MoBE Adam epochs (default 500, as benchmarks/peers.py)")
    a("--mobe-sweep", nargs="*", default=["m=E/8", "lr=0.02"], help="--bf16: MoBE configs beside its defaults "
      "(benchmarks/peers.py's --mobe-sweep; default m=E/8 lr=0.02)")
    a("--reuse", metavar="JSON", help="an earlier run's output on the same models and settings: the rows this run "
      "does not make (quantizers not in --quantizers, product rows with --no-product, pruning) are taken from it")
    a("--out", default=str(REPO / "benchmarks" / "results" / "bytes_product.json"), help="JSON output path")
    return p.parse_args(argv)


def size_gib(model_dir: Path, bits: float) -> float:
    """The --size (GiB) whose gate + up families may take `bits` bits per routed weight."""
    from globe.fit.planning.bytes import GIB, source_bytes
    from globe.io import open_checkpoint
    with open_checkpoint(model_dir) as reader:
        other, dense = source_bytes(reader, FAMILIES)
        width = reader.inventory().dtype
    from globe.fit.planning.bytes import value_bytes_of
    weights = sum(dense.values()) // value_bytes_of(width)
    return (other + int(weights * bits / 8)) / GIB


def product_plans(model_dir: Path, bits: float, stats: str, kind: str | None = None, extra: tuple[str, ...] = ()):
    """(FitConfig, [SizePlan]) of `globe compress MODEL --size S` + `extra` options with the calibration statistics
    `stats`: the config before any plan is applied and every kind that fits (SIZE_RULE's first); kind: that kind
    alone (the tuning run, benchmarks/size_rule.py)."""
    from globe.cli import compress
    from globe.cli.main import build_parser
    from globe.fit.planning.bytes import apply_size
    args = build_parser().parse_args(["compress", str(model_dir), "-o", "unused", "--size",
                                      repr(size_gib(model_dir, bits)), *extra])   # exact: bytes / 2**30 (12 digits
                                                                           # lost a byte, so a GPTQ row's size missed it)
    if kind is None:
        cfg, plans = compress._config_plans(args)      # set to the first plan; each plan is applied to a copy
    else:
        cfg = compress.build_config(compress._fit_args(args))
        plans = [apply_size(cfg, str(model_dir), args.size, kind=kind)]
    cfg.activation.stats = stats
    cfg.bank.families = FAMILIES
    if kind is not None:                               # the tuning run: the kind alone, as before the phase
        cfg.expert.steps = 0
    return cfg, plans


def product_config(model_dir: Path, bits: float, stats: str, kind: str | None = None):
    """(FitConfig, SizePlan) of SIZE_RULE's plan alone (benchmarks/size_rule.py)."""
    from globe.fit.planning.bytes import apply_plan
    cfg, plans = product_plans(model_dir, bits, stats, kind)
    return apply_plan(cfg, plans[0]).validate(), plans[0]


@torch.no_grad()
def kl_top1(model, ids: torch.Tensor, reference: list[torch.Tensor], window: int) -> dict[str, float]:
    """benchmarks.bytes.kl_top1 (mean KL(reference || model) per token, top-1 agreement) on the same windows, and
    the model's perplexity of the held-out text (each window's next tokens), from the same forward passes."""
    kl, agree, n, nll, count = 0.0, 0, 0, 0.0, 0
    for start, ref in zip(range(0, ids.numel(), window), reference):
        seg = ids[start:start + window]
        got = torch.log_softmax(model(input_ids=seg[None], use_cache=False).logits[0].float(), -1)
        kl += float((ref.exp() * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += ref.shape[0]
        nll -= float(got[:-1].gather(1, seg[1:, None]).sum())
        count += seg.numel() - 1
    return {"kl": kl / n, "top1": agree / n, "ppl": math.exp(nll / count)}


def reference_ppl(ctx: dict, window: int) -> float:
    """The original model's perplexity of the held-out text (its reference log-probs)."""
    nll, count = 0.0, 0
    for start, ref in zip(range(0, ctx["ids"].numel(), window), ctx["reference"]):
        seg = ctx["ids"][start:start + window]
        nll -= float(ref[:-1].gather(1, seg[1:, None]).sum())
        count += seg.numel() - 1
    return math.exp(nll / count)


def _swap_kl(ctx: dict, result, args) -> dict:
    fams = result.families
    set_families(ctx["model"], {f: by_layer(fams[f].reconstruct(), fams[f].ids) for f in FAMILIES})
    return kl_top1(ctx["model"], ctx["ids"], ctx["reference"], args.window)


def product_row(ctx: dict, bits: float, args, kind: str | None = None, extra: tuple[str, ...] = (),
                method: str = "globe-product", plans_of=None) -> dict:
    """`globe compress --size` (+ `extra` options) at `bits`: every candidate fitted and scored on held-out calib.txt
    tokens, the lowest kept; the kept one swapped into the model: KL / top-1 on heldout.txt and the stored bytes.
    plans_of: the (FitConfig, [SizePlan]) instead of product_plans' (bf16_plans)."""
    import tempfile
    from globe.fit.planning.bytes import result_bytes
    from globe.run.calibrate import CalibrateRun
    from globe.run.size_choice import build_candidates, held_out
    cfg, plans = plans_of or product_plans(ctx["dir"], bits, ctx["stats"], kind, extra)
    if args.expert_steps is not None:
        cfg.expert.steps = args.expert_steps
    if cfg.expert.enabled:                             # compress collects them at its calibration: the same here
        cfg.expert.samples_file = routed_samples(ctx, cfg, args)
    if len(plans) == 1:                                # one kind fits (or is forced): nothing to choose
        return _single_row(ctx, bits, args, cfg, plans[0], method)
    calibration = CalibrateRun(str(ctx["dir"]), str(ctx["dir"] / "calib.txt"), "", max_tokens=args.calib_tokens,
                               window=args.window, flag="--calibration-text")
    held = held_out(str(ctx["dir"]), calibration, cfg.train.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        results, choice = build_candidates(str(ctx["dir"]), cfg, plans, Path(work), held)
    seconds = round(time.perf_counter() - t0, 1)
    for cand, result in zip(choice["candidates"], results):
        cand["heldout"] = _swap_kl(ctx, result, args)          # every candidate on heldout.txt: was the choice right?
    best = choice["index"]
    result, plan = results[best], plans[best]
    counted = result_bytes(result)
    stored = sum(counted["families"][f]["stored"] for f in FAMILIES)
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    fams = result.families
    row = {"method": "globe-product", "target_bits": bits, "kind": plan.kind, "plan": plan.to_dict(),
           "describe": plan.describe(), "choice": choice, "bits_per_weight": 8 * stored / dense, "bytes": stored,
           "bytes_by_part": {f: counted["families"][f]["parts"] for f in FAMILIES},
           "rel_err": {f: fams[f].metrics["rel_err"] for f in FAMILIES},
           **_swap_kl(ctx, result, args), "fit_seconds": seconds}
    log.info("%-5s %.2f bits target: %-9s %6.3f bits  KL %.6f  top1 %.4f  (%s; candidates %s)", ctx["dir"].name[:5],
             bits, plan.kind, row["bits_per_weight"], row["kl"], row["top1"], plan.describe(),
             ", ".join(f"{c['kind']} held-out calib KL {c['kl']:.6f} / heldout.txt {c['heldout']['kl']:.6f}"
                       for c in choice["candidates"]))
    return row


def routed_samples(ctx: dict, cfg, args) -> str:
    """The whole-expert phase's routed samples of the calibration tokens (what `globe compress` keeps at its
    calibration: cfg.expert.samples per expert), cached beside the statistics."""
    import transformers

    from benchmarks.bytes import load_causal_lm, texts
    from globe.calibration import collect_stats
    from globe.calibration.routed import save_routed
    path = Path(ctx["stats"]).with_name(Path(ctx["stats"]).stem + f"_routed{cfg.expert.samples}.safetensors")
    if not path.is_file():
        tok = transformers.AutoTokenizer.from_pretrained(str(ctx["dir"]))
        calib_ids = texts(ctx["dir"], tok, args)[0]
        model = load_causal_lm(ctx["dir"], torch.float32)       # the original (ctx's model holds swapped weights)
        stats = collect_stats(model, calib_ids, window=args.window, routed=cfg.expert.samples,
                              routed_mb=cfg.expert.max_sample_mb)
        save_routed(stats.routed, path)
    return str(path)


def _single_row(ctx: dict, bits: float, args, cfg, plan, method: str = "globe-product") -> dict:
    import globe
    from globe.fit.planning.bytes import result_bytes
    from globe.run.size_choice import candidate_config
    t0 = time.perf_counter()
    result = globe.fit_model(ctx["dir"], candidate_config(cfg, plan, quiet=True).validate())
    seconds = round(time.perf_counter() - t0, 1)
    counted = result_bytes(result)
    stored = sum(counted["families"][f]["stored"] for f in FAMILIES)
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    return {"method": method, "target_bits": bits, "kind": plan.kind, "plan": plan.to_dict(),
            "describe": plan.describe(), "choice": None, "bits_per_weight": 8 * stored / dense, "bytes": stored,
            "checkpoint_bytes": counted["after"], "size_bytes": plan.target_bytes,
            "bytes_by_part": {f: counted["families"][f]["parts"] for f in FAMILIES},
            "rel_err": {f: result.families[f].metrics["rel_err"] for f in FAMILIES},
            **_swap_kl(ctx, result, args), "fit_seconds": seconds}


def quantizer_rows(ctx: dict, args, method: str = "gptq") -> list[dict]:
    """Per-expert weight-only quantization of gate + up at 2, 3, 4 bits and groups 32, 64, 128: GPTQ under each
    expert's routed Hessian, RTN and HQQ (data-free) with the same group scales and zeros (globe.quant)."""
    rows = []
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    hessians = ctx["hessians"] if method == "gptq" else None
    for bits in (4, 3, 2):
        for group in (32, 64, 128):
            fits = {f: quantized(ctx["weights"][f], QuantConfig(method, bits, group), hessians) for f in FAMILIES}
            set_families(ctx["model"], {f: fits[f].weights for f in FAMILIES})
            total = sum(fits[f].total_bytes for f in FAMILIES)
            rows.append({"method": method, "bits": bits, "group": group, "bits_per_weight": 8 * total / dense,
                         "bytes": total, **kl_top1(ctx["model"], ctx["ids"], ctx["reference"], args.window)})
            log.info("%s %d-bit group %3d: %6.3f bits  KL %.6f", method, bits, group, rows[-1]["bits_per_weight"],
                     rows[-1]["kl"])
    return rows


def pruning_rows(ctx: dict, args) -> list[dict]:
    """REAP expert pruning, alone (bf16) and stacked with per-expert GPTQ of the kept experts (llm-compressor's
    recipe: a structural cut, then quantization): per layer REAP keeps the round(keep x E) most salient experts on
    the calibration tokens (benchmarks/baselines/reap.py; experts and router rows removed, a valid smaller
    checkpoint), whose gate/up are then GPTQ-quantized under their own routed Hessians at 2, 3, 4 bits and groups
    32 / 64 / 128. Bits per routed gate/up weight count the kept experts' bytes against the ORIGINAL experts'
    weights; the dropped experts' down projections and router rows are saved too and not counted (in the
    pruning's favour)."""
    import tempfile

    import transformers

    from benchmarks.baselines.checkpoint import load_causal_lm, read_families
    from benchmarks.baselines.reap import reap_keep, write_pruned
    from benchmarks.baselines.routed import capture_routed
    from benchmarks.bytes import texts
    original = load_causal_lm(ctx["dir"], torch.float32)           # ctx's model may hold swapped weights
    tok = transformers.AutoTokenizer.from_pretrained(str(ctx["dir"]))
    routed, act = capture_routed(original, texts(ctx["dir"], tok, args)[0], args.window)
    families = read_families(original)
    layers, experts = families["gate"].shape[:2]
    top_k = int(original.config.num_experts_per_tok)
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    rows: list[dict] = []
    for keep_frac in args.prune_keep:
        k = max(top_k, round(keep_frac * experts))
        keep, _ = reap_keep(families, act, routed, k)                                       # [L, k]
        kept = {f: torch.stack([ctx["weights"][f][l, keep[l]] for l in range(layers)]) for f in FAMILIES}
        hess = torch.stack([ctx["hessians"][l, keep[l]] for l in range(layers)])            # [L, k, d, d]
        with tempfile.TemporaryDirectory() as work:
            pruned = load_causal_lm(write_pruned(ctx["dir"], keep, Path(work) / "pruned"), torch.float32)
        for cfg in [None] + [QuantConfig("gptq", b, g) for b in (4, 3, 2) for g in (32, 64, 128)]:
            if cfg is None:                                                                 # pruning alone, bf16
                fams, total = kept, sum(kept[f].numel() * 2 for f in FAMILIES)
            else:
                fits = {f: quantized(kept[f], cfg, hess) for f in FAMILIES}
                fams, total = {f: fits[f].weights for f in FAMILIES}, sum(fits[f].total_bytes for f in FAMILIES)
            set_families(pruned, fams)
            rows.append({"method": "reap" if cfg is None else "reap+gptq", "experts_kept": k, "experts": experts,
                         "bits": cfg and cfg.bits, "group": cfg and cfg.group, "bits_per_weight": 8 * total / dense,
                         "bytes": total, **kl_top1(pruned, ctx["ids"], ctx["reference"], args.window)})
            log.info("reap %d/%d %s: %6.3f bits  KL %.6f", k, experts,
                     "bf16" if cfg is None else f"gptq {cfg.bits}-bit group {cfg.group}",
                     rows[-1]["bits_per_weight"], rows[-1]["kl"])
    return rows


def bf16_plans(ctx: dict, bits: float):
    """(FitConfig, [SizePlan], refusal or None) of `globe compress --size S --no-quant`; where the command refuses
    it (plain quantization is the rule at this size), the factors-only plan at the same size, forced."""
    from globe.cli import compress
    from globe.cli.main import build_parser
    from globe.errors import ConfigError
    from globe.fit.expert_config import COMPRESS_STEPS
    from globe.fit.planning.bytes import apply_size
    try:
        cfg, plans = product_plans(ctx["dir"], bits, ctx["stats"], extra=("--no-quant",))
        return cfg, plans, None
    except ConfigError as err:
        refusal = str(err)
    args = build_parser().parse_args(["compress", str(ctx["dir"]), "-o", "unused", "--no-quant", "--size",
                                      repr(size_gib(ctx["dir"], bits))])
    cfg = compress.build_config(compress._fit_args(args))
    cfg.expert.steps = COMPRESS_STEPS                  # what the command runs where the phase applies
    plan = apply_size(cfg, str(ctx["dir"]), args.size, bits_given=True, kind="factors")
    cfg.activation.stats = ctx["stats"]
    cfg.bank.families = FAMILIES
    return cfg, [plan], refusal


def bf16_globe_row(ctx: dict, bits: float, args) -> dict:
    """bf16 GloBE at `bits`: `globe compress --size S --no-quant` (bf16_plans), scored as the product row; its
    whole checkpoint's bytes by the byte model checked against the size."""
    cfg, plans, refusal = bf16_plans(ctx, bits)
    row = product_row(ctx, bits, args, method="globe-bf16", plans_of=(cfg, plans))
    row["refused"] = refusal
    row["within_size"] = row["checkpoint_bytes"] <= row["size_bytes"]
    if not row["within_size"]:
        log.error("bf16 GloBE at %.2f bits: %d bytes > the size's %d", bits, row["checkpoint_bytes"],
                  row["size_bytes"])
    log.info("%-5s %.2f bits bf16 GloBE: %6.3f bits  KL %.6f  top1 %.4f  (%s%s)", ctx["dir"].name[:5], bits,
             row["bits_per_weight"], row["kl"], row["top1"], row["describe"], "; forced" if refusal else "")
    return row


def mobe_row(ctx: dict, bits: float, args) -> dict:
    """MoBE at its best in bf16 at `bits`: every config of benchmarks/peers.py's sweep at the largest per-family
    parameter budget whose stored params x the model's bytes per value fit the gate + up bytes of the size (each
    family its half), the lowest summed squared relative weight error kept, swapped into the model (its weights at
    the model's dtype, as peers.py's dense checkpoint) and scored."""
    from benchmarks.baselines import rel_err
    from benchmarks.baselines.mobe import fit_mobe, mobe_params, mobe_rank
    from benchmarks.peers import sweep_configs
    from globe.fit.planning.bytes import value_bytes_of
    from globe.io import open_checkpoint
    with open_checkpoint(ctx["dir"]) as reader:
        source_dtype = reader.inventory().dtype
    width = value_bytes_of(source_dtype)
    layers, e, p, d = ctx["weights"]["gate"].shape
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    limit = int(dense * bits / 8) // len(FAMILIES)                      # each family's bytes (size_gib's split)
    sweep = []
    for cfg in sweep_configs(args.mobe_sweep, e, args.mobe_epochs):
        m = cfg.m or max(1, e // 4)
        budget = (limit // width) / (layers * e * p * d)
        while budget > 0 and mobe_params(layers, e, p, d, m, mobe_rank(e, p, d, m, budget)) * width > limit:
            budget *= 1 - 1e-9                                          # float rounding: one rank less
        t0 = time.perf_counter()
        fits = {f: fit_mobe(ctx["weights"][f], budget, cfg) for f in FAMILIES}
        errs = {f: rel_err(ctx["weights"][f], fit.weights) for f, fit in fits.items()}
        sweep.append({"cfg": cfg, "budget": budget, "fits": fits, "rel_err": errs,
                      "seconds": round(time.perf_counter() - t0, 1)})
    best = min(sweep, key=lambda s: sum(v * v for v in s["rel_err"].values()))
    dtype = getattr(torch, str(source_dtype).removeprefix("torch."))
    set_families(ctx["model"], {f: best["fits"][f].weights.to(dtype).float() for f in FAMILIES})
    stored = sum(best["fits"][f].params for f in FAMILIES) * width
    row = {"method": "mobe-bf16", "target_bits": bits, "bits_per_weight": 8 * stored / dense, "bytes": stored,
           "family_limit": limit, "budget": best["budget"], "rel_err": best["rel_err"],
           "config": {**vars(best["cfg"]), "m": best["fits"]["gate"].info["m"]}, "r": best["fits"]["gate"].info["r"],
           "sweep": [{"config": {**vars(s["cfg"]), "m": s["fits"]["gate"].info["m"]}, "r": s["fits"]["gate"].info["r"],
                      "rel_err": s["rel_err"], "fit_seconds": s["seconds"]} for s in sweep],
           **kl_top1(ctx["model"], ctx["ids"], ctx["reference"], args.window),
           "fit_seconds": round(sum(s["seconds"] for s in sweep), 1)}
    log.info("%-5s %.2f bits MoBE bf16: %6.3f bits  KL %.6f  top1 %.4f  (m=%d r=%d lr=%g)", ctx["dir"].name[:5], bits,
             row["bits_per_weight"], row["kl"], row["top1"], row["config"]["m"], row["r"], row["config"]["lr"])
    return row


def bf16_compare(entry: dict, quantizers: tuple[str, ...] = QUANTIZERS) -> list[dict]:
    """At each size with a bf16 row: bf16 GloBE's and MoBE's KL against the product row's and the best quantizer's
    within the size (ratio < 1: the bf16 row is closer)."""
    quant = [r for m in quantizers for r in entry.get(m, [])]
    product = {r["target_bits"]: r for r in entry.get("product", [])}
    out = []
    for size in sorted({r["target_bits"] for r in entry.get("bf16_globe", []) + entry.get("bf16_mobe", [])}):
        g = next((r for r in entry.get("bf16_globe", []) if r["target_bits"] == size), None)
        mo = next((r for r in entry.get("bf16_mobe", []) if r["target_bits"] == size), None)
        fit = [q for q in quant if q["bits_per_weight"] <= size + 1e-9]
        q = min(fit, key=lambda r: r["kl"]) if fit else None
        prod = product.get(size)
        ratio = lambda row, ref: row and ref and row["kl"] / ref["kl"]     # noqa: E731
        out.append({"target_bits": size, "globe_bf16_bits": g and g["bits_per_weight"], "globe_bf16_kl": g and g["kl"],
                    "mobe_bits": mo and mo["bits_per_weight"], "mobe_kl": mo and mo["kl"],
                    "product_kind": prod and prod["kind"], "product_kl": prod and prod["kl"],
                    "best_quantizer": q and f"{q['method']} {q['bits']}-bit group {q['group']}",
                    "best_quantizer_kl": q and q["kl"],
                    "globe_bf16/product": ratio(g, prod), "globe_bf16/best_quantizer": ratio(g, q),
                    "mobe/product": ratio(mo, prod), "mobe/best_quantizer": ratio(mo, q)})
    return out


def reused(path: str, args) -> dict[str, dict]:
    """{model directory name: its entry} of an earlier run (--reuse); refused where its settings differ."""
    doc = json.loads(Path(path).read_text())
    for key in ("calib_tokens", "kl_tokens", "window"):
        if doc["settings"].get(key) != getattr(args, key):
            raise SystemExit(f"bytes_product.py: error: --reuse {path} ran at {key} {doc['settings'].get(key)}, "
                             f"this run at {getattr(args, key)}")
    return {Path(e["model"]["dir"]).name: e for e in doc["models"]}


def gptq_rows(ctx: dict, args) -> list[dict]:
    """Per-expert GPTQ of gate + up (routed Hessians) at 2, 3, 4 bits and groups 32, 64, 128."""
    return quantizer_rows(ctx, args, "gptq")


def compare(product: list[dict], gptq: list[dict], others: list[dict] | None = None) -> list[dict]:
    """Each product row against the best GPTQ row within the same size (the --size target: GPTQ may use every byte
    the product was allowed; ratio < 1: the product is closer), against the best GPTQ row of at most the
    product's own bytes (the solver's byte model is an upper bound, so the product may use fewer), and against the
    best row of every quantizer run (GPTQ, RTN, HQQ: `others`) within the size."""
    def best(rows: list[dict], cap: float) -> dict | None:
        fit = [g for g in rows if g["bits_per_weight"] <= cap + 1e-9]
        return min(fit, key=lambda g: g["kl"]) if fit else None
    out = []
    for row in product:
        at, own = best(gptq, row["target_bits"]), best(gptq, row["bits_per_weight"])
        any_q = best(gptq + list(others or []), row["target_bits"])
        out.append({"target_bits": row["target_bits"], "kind": row["kind"], "bits": row["bits_per_weight"],
                    "kl": row["kl"], "top1": row["top1"], "ppl": row.get("ppl"),
                    "describe": row.get("describe"), "gptq": at and f"{at['bits']}-bit group {at['group']}",
                    "gptq_bits": at and at["bits_per_weight"], "gptq_kl": at and at["kl"],
                    "gptq_ppl": at and at.get("ppl"), "gptq_top1": at and at.get("top1"),
                    "ratio": at and row["kl"] / at["kl"],
                    "gptq_own_bits": own and f"{own['bits']}-bit group {own['group']}",
                    "ratio_own_bits": own and row["kl"] / own["kl"],
                    "best_quantizer": any_q and f"{any_q['method']} {any_q['bits']}-bit group {any_q['group']}",
                    "best_quantizer_kl": any_q and any_q["kl"],
                    "ratio_best_quantizer": any_q and row["kl"] / any_q["kl"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("globe").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()}, "models": []}
    earlier = reused(args.reuse, args) if args.reuse else {}

    def save() -> None:                                 # after every row: a run stopped early keeps what it made
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(Path(args.out), json.dumps(report, indent=1, default=float))

    for model_dir in args.models:
        ctx = prepare(Path(model_dir), args)
        ctx["info"]["ppl"] = reference_ppl(ctx, args.window)
        entry = {"model": ctx["info"], "product": []}
        for method in args.quantizers:                  # the quantizers on the same tensors, same run
            entry[method] = quantizer_rows(ctx, args, method)
        old = earlier.get(Path(model_dir).name, {})
        made = set(args.quantizers) | ({"pruning"} if args.pruning else set()) | \
            (set() if args.no_product else {"product", "comparison"})
        entry["reused"] = [k for k in (*QUANTIZERS, "product", "comparison", "pruning") if k in old and k not in made]
        entry.update({k: old[k] for k in entry["reused"]})
        entry.setdefault("gptq", [])
        others = [r for m in QUANTIZERS if m != "gptq" for r in entry.get(m, [])]
        if "gptq" in args.quantizers and entry["product"]:          # the reused product against this run's GPTQ
            entry["comparison"] = compare(entry["product"], entry["gptq"], others)
        report["models"].append(entry)
        if args.pruning:
            entry["pruning"] = pruning_rows(ctx, args)
        save()
        for bits in ([] if args.no_product else args.sizes):
            entry["product"].append(product_row(ctx, bits, args))
            entry["comparison"] = compare(entry["product"], entry["gptq"], others)
            save()
        for bits in (args.sizes if args.bf16 else []):
            entry.setdefault("bf16_mobe", []).append(mobe_row(ctx, bits, args))
            entry["bf16_comparison"] = bf16_compare(entry)
            save()
            entry.setdefault("bf16_globe", []).append(bf16_globe_row(ctx, bits, args))
            entry["bf16_comparison"] = bf16_compare(entry)
            save()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    for entry in report["models"]:
        print(f"\n{entry['model']['dir']}")
        for c in entry.get("comparison", []):
            print(f"  {c['target_bits']:.2f} bits: {c['kind']:9} {c['bits']:.3f} bits KL {c['kl']:.6f} ppl "
                  f"{c['ppl']:.3f} | GPTQ {c['gptq']} ({c['gptq_bits']:.3f} bits) KL {c['gptq_kl']:.6f} ppl "
                  f"{c['gptq_ppl']:.3f} | ratio {c['ratio']:.2f}"
                  if c["gptq"] else f"  {c['target_bits']:.2f} bits: {c['kind']} KL {c['kl']:.6f} | no GPTQ row")


if __name__ == "__main__":
    main()
