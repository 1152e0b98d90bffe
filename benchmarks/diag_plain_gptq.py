"""Why globe's plain family (budget 0 + GPTQ residuals over no base) and the bytes benchmark's per-expert GPTQ differ
at the same bits and group on the same calibration tokens: KL(original || compressed) on heldout.txt of

  bench          benchmarks/bytes.py's GPTQ: H_e = S_e + 64 C_l (unnormalised), GPTQ's own damping
  globe          `globe compress --size` at exactly that GPTQ row's bytes (the plain candidate, fitted)
  H variants     GPTQ of the same weights under Hessians between the two, to name the cause:
                 globe-H     H_e = L_e L_e^T from the fit's right factors (globe.fit.solvers.residual.expert_hessians,
                             what the fit used before: C_e / mean eigenvalue + the objective's damp 0.01 I)
                 globe-H-undamped  the fit's Hessians now (Whitener.hessians: L_e L_e^T - damp I)
                 norm+damp   (S_e + 64 C_l) / (n_e + 64) / mean eigenvalue + damp I, in fp64 (no fp32 factor)
                 norm        the same without the objective's damp
                 reached     bench's H, except that experts no calibration token reaches get H = I (the fit's
                             weight-space fallback for them)

    OMP_NUM_THREADS=1 python benchmarks/diag_plain_gptq.py benchmarks/models/upcycled-qwen2moe --bits 4 --group 64
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

from benchmarks.baselines.checkpoint import FAMILIES, set_families  # noqa: E402
from benchmarks.baselines.common import by_layer  # noqa: E402
from benchmarks.baselines.quant import flat, quantized  # noqa: E402
from benchmarks.bytes import kl_top1, prepare  # noqa: E402
from globe.quant import QuantConfig, quantize  # noqa: E402

log = logging.getLogger("benchmarks.diag_plain_gptq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("model", nargs="?", default=str(REPO / "benchmarks/models/upcycled-qwen2moe"))
    a("--bits", type=int, default=4)
    a("--group", type=int, default=64)
    a("--calib-tokens", type=int, default=16384)
    a("--kl-tokens", type=int, default=4096)
    a("--window", type=int, default=256)
    a("--stats-dir", default=str(REPO / "runs" / "bytes"))
    a("--skip-fit", action="store_true", help="only the Hessian variants (no globe fit)")
    a("--out", help="JSON output path")
    return p.parse_args(argv)


def score(ctx: dict, weights: dict[str, torch.Tensor], args) -> dict:
    set_families(ctx["model"], weights)
    return kl_top1(ctx["model"], ctx["ids"], ctx["reference"], args.window)


def gptq(ctx: dict, cfg: QuantConfig, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every expert of gate and up quantized with GPTQ under h [L, E, d, d]."""
    return {f: quantize(flat(ctx["weights"][f]), cfg, flat(h)).dequantize().view_as(ctx["weights"][f])
            for f in FAMILIES}


def main(argv=None) -> dict:
    from globe.calibration import load_stats
    from globe.fit.objectives.activation import build_whitener, second_moments
    from globe.fit.solvers.residual import expert_hessians
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("globe").setLevel(logging.WARNING)
    ctx = prepare(Path(args.model), args)
    cfg = QuantConfig("gptq", args.bits, args.group)
    rows: dict[str, dict] = {}
    bench = {f: quantized(ctx["weights"][f], cfg, ctx["hessians"]).weights for f in FAMILIES}
    rows["bench"] = score(ctx, bench, args)
    log.info("bench     KL %.6e", rows["bench"]["kl"])

    stats = load_stats(ctx["stats"])
    L, E, d = ctx["hessians"].shape[0], ctx["hessians"].shape[1], ctx["hessians"].shape[-1]
    ids = torch.stack(torch.meshgrid(torch.tensor(stats.layers), torch.arange(E), indexing="ij"), -1).reshape(-1, 2)
    whitener = build_whitener(stats, "gate", ids, d, per_expert=True, prior_tokens=64.0, damp=0.01,
                              unreached_weight_space=True)
    h_globe = torch.cat([expert_hessians(whitener.select, torch.arange(lo, min(lo + 16, L * E)), d)
                         for lo in range(0, L * E, 16)]).view(L, E, d, d)
    rows["globe-H"] = score(ctx, gptq(ctx, cfg, h_globe), args)
    log.info("globe-H   KL %.6e", rows["globe-H"]["kl"])
    moments = second_moments(stats, "gate", True, 64.0)                                   # [L, E, d, d] fp64
    normed = moments / moments.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(d, dtype=torch.float64)
    rows["norm+damp"] = score(ctx, gptq(ctx, cfg, normed + 0.01 * eye), args)
    log.info("norm+damp KL %.6e", rows["norm+damp"]["kl"])
    rows["norm"] = score(ctx, gptq(ctx, cfg, normed), args)
    log.info("norm      KL %.6e", rows["norm"]["kl"])
    unreached = stats.counts == 0
    rows["unreached"] = {"experts": int(unreached.sum())}
    if bool(unreached.any()):
        h = ctx["hessians"].double().clone()
        h[unreached] = eye
        rows["reached"] = score(ctx, gptq(ctx, cfg, h), args)
        log.info("reached   KL %.6e (%d experts no token reaches)", rows["reached"]["kl"], int(unreached.sum()))
    rows["globe_H_vs_norm_damp_rel_diff"] = float((h_globe.double() - normed - 0.01 * eye).norm() / normed.norm())
    h_fixed = torch.cat([whitener.hessians(torch.arange(lo, min(lo + 16, L * E)))
                         for lo in range(0, L * E, 16)]).view(L, E, d, d)                  # what the fit now uses
    rows["globe-H-undamped"] = score(ctx, gptq(ctx, cfg, h_fixed), args)
    log.info("globe-H-undamped KL %.6e", rows["globe-H-undamped"]["kl"])

    if not args.skip_fit:
        import globe
        from benchmarks.bytes_product import product_plans
        from globe.run.size_choice import candidate_config
        gptq_bits = args.bits + 32 / args.group
        cfg_fit, plans = product_plans(ctx["dir"], gptq_bits, ctx["stats"])
        plain = next(p for p in plans if p.kind == "plain")
        rows["plan"] = plain.to_dict()
        result = globe.fit_model(ctx["dir"], candidate_config(cfg_fit, plain, quiet=True).validate())
        fams = result.families
        rows["globe"] = score(ctx, {f: by_layer(fams[f].reconstruct(), fams[f].ids) for f in FAMILIES}, args)
        log.info("globe     KL %.6e (plain %d-bit group %d)", rows["globe"]["kl"], plain.residual_bits,
                 plain.residual_group)
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
