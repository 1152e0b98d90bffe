"""Bytes, not parameters: KL to the original model against bits per routed weight, quantizers vs GloBE (+ quant).

For each model (default: the embedded model and the two evaluation models), only the routed experts' gate and up
projections are compressed; each result's weights are swapped into the original model (fp32) and scored by
  KL       mean over held-out tokens of KL(original || compressed) of the next-token distributions (nats / token)
  top1     agreement of the two models' argmax next tokens
  bits     8 * (every stored byte of gate + up: packed codes, fp16 scales and zeros, bf16 factors, sparse codes
           with their indices) / (dense gate + up weight count)
Methods, all in one run:
  rtn / hqq / gptq       at 4, 3, 2 bits, groups 32 / 64 / 128 (hqq: 64; gptq: per-expert Hessians of the
                         routed tokens of the calibration text, blended with the layer's as the activation-aware
                         fit blends them)
  globe                  activation-aware GloBE fits (globe.fit_model, FitConfig.activation) at --budgets, bf16
  globe+after            (a) bank + adapters quantized (RTN) after the fit, 8 and 4 bits
  globe+refit            (b) bank quantized (GPTQ), adapters refitted to it and quantized with GPTQ, 8 / 4 / 3 bits
  globe+resid            (c) a GloBE part (8- or 4-bit refit; bf16 at budgets <= 0.1) + the residual W - W_hat
                         quantized with GPTQ (2 bits group 128 / 64, 3 bits group 128), up to ~5.25 bits
  svd-llm+resid          (c) without sharing: per-expert whitened SVD at the budgets <= 0.1 + the same residuals
Calibration: MODEL/calib.txt (statistics collected once per model into --stats-dir and reused); the embedded
model has no calibration split, so the first half of its heldout.txt calibrates and the KL is measured on the
second half. One JSON: --out (written after every model).

    python benchmarks/bytes.py                              # three models, 28 min on one (shared) thread
    python benchmarks/bytes.py benchmarks/models/upcycled-qwen2moe --budgets 0.35
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

from benchmarks.baselines.checkpoint import FAMILIES, load_causal_lm, read_families, set_families  # noqa: E402
from benchmarks.baselines.quant import (Compressed, globe_after, globe_bf16, globe_refit, quantized,  # noqa: E402
                                        residual)
from globe.quant import QuantConfig  # noqa: E402

log = logging.getLogger("benchmarks.bytes")
RESIDUALS = ((2, 128), (2, 64), (3, 128))     # (bits, group) of the residual quantizer in (c)
MAX_RESIDUAL_BITS = 5.25                      # (c) only where base + the smallest residual fits under this
MODELS = ("globe/assets/globe-tiny-moe", "benchmarks/models/upcycled-qwen2moe",
          "benchmarks/models/scratch-qwen2moe-e48")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("models", nargs="*", default=[str(REPO / m) for m in MODELS], help="model directories (default: three)")
    a("--bits", type=int, nargs="+", default=[4, 3, 2], help="quantizer bits (default 4 3 2)")
    a("--groups", type=int, nargs="+", default=[32, 64, 128], help="quantizer group sizes (default 32 64 128)")
    a("--hqq-groups", type=int, nargs="+", default=[64], help="HQQ group sizes (default 64, HQQ's own default)")
    a("--budgets", type=float, nargs="+", default=[0.06, 0.35, 0.6, 0.8],
      help="GloBE per-family parameter budgets (default 0.06 0.35 0.6 0.8)")
    a("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    a("--kl-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    a("--window", type=int, default=256, help="window of calibration and scoring (default 256)")
    a("--am-iters", type=int, default=10, help="GloBE AM iterations (default 10)")
    a("--act-steps", type=int, default=60, help="GloBE activation-aware VarPro evaluations (default 60)")
    a("--stats-dir", default=str(REPO / "runs" / "bytes"), help="calibration statistics files (reused)")
    a("--out", default=str(REPO / "benchmarks" / "results" / "bytes.json"), help="JSON output path")
    return p.parse_args(argv)


def texts(model_dir: Path, tok, args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration ids, held-out ids, how they were split)."""
    from globe.eval import encode_text
    heldout = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    if (model_dir / "calib.txt").is_file():
        calib, split = (model_dir / "calib.txt").read_text(encoding="utf-8"), "calib.txt / heldout.txt"
    else:
        half = len(heldout) // 2
        calib, heldout, split = heldout[:half], heldout[half:], "heldout.txt: first half / second half"
    calib_ids = encode_text(tok, calib)[:args.calib_tokens]
    kl_ids = encode_text(tok, heldout)[:args.kl_tokens]
    return calib_ids, kl_ids, split


@torch.no_grad()
def log_probs(model, ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Next-token log-probabilities [n, V] (fp32) of each non-overlapping window of ids."""
    return [torch.log_softmax(model(input_ids=ids[s:s + window][None], use_cache=False).logits[0].float(), -1)
            for s in range(0, ids.numel(), window)]


@torch.no_grad()
def kl_top1(model, ids: torch.Tensor, reference: list[torch.Tensor], window: int) -> dict[str, float]:
    """Mean KL(reference || model) per token (nats) and top-1 agreement, on the same windows."""
    kl, agree, n = 0.0, 0, 0
    for ref, got in zip(reference, log_probs(model, ids, window)):
        kl += float((ref.exp() * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += ref.shape[0]
    return {"kl": kl / n, "top1": agree / n}


def prepare(model_dir: Path, args) -> dict:
    """Model (fp32), its gate/up, calibration statistics and Hessians, reference log-probs."""
    import transformers
    from globe.calibration import collect_stats, load_stats, save_stats
    from globe.fit.objectives.activation import second_moments
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    calib_ids, kl_ids, split = texts(model_dir, tok, args)
    model = load_causal_lm(model_dir, torch.float32)
    stats_path = Path(args.stats_dir) / f"{model_dir.name}_{calib_ids.numel()}.safetensors"
    t0 = time.perf_counter()
    if not stats_path.is_file():
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        save_stats(collect_stats(model, calib_ids, window=args.window, info={"text": split}), stats_path)
    stats = load_stats(stats_path)
    weights = read_families(model)
    moments = second_moments(stats, "gate", per_expert=True, prior_tokens=64.0).float()     # [L, E, d, d]
    hessians = moments * (stats.counts.double() + 64.0)[..., None, None].float()            # H = sum x x^T
    reference = log_probs(model, kl_ids, args.window)
    info = {"dir": str(model_dir), "layers": weights["gate"].shape[0], "experts": weights["gate"].shape[1],
            "p": weights["gate"].shape[2], "d": weights["gate"].shape[3], "split": split,
            "calib_tokens": int(calib_ids.numel()), "kl_tokens": int(kl_ids.numel()), "stats": str(stats_path),
            "calibration_seconds": round(time.perf_counter() - t0, 1)}
    return {"dir": model_dir, "model": model, "weights": weights, "moments": moments, "hessians": hessians,
            "stats": str(stats_path), "ids": kl_ids, "reference": reference, "info": info}


def score(ctx: dict, method: str, fits: dict[str, Compressed], args, **extra) -> dict:
    """Swap the families into the model, measure KL / top-1, account bytes; one JSON row."""
    set_families(ctx["model"], {f: fits[f].weights for f in FAMILIES})
    dense = sum(ctx["weights"][f].numel() for f in FAMILIES)
    total = sum(fits[f].total_bytes for f in FAMILIES)
    parts: dict[str, int] = {}
    for f in FAMILIES:
        for k, v in fits[f].bytes.items():
            parts[k] = parts.get(k, 0) + v
    rel = math.sqrt(sum(float((fits[f].weights - ctx["weights"][f]).square().sum()) for f in FAMILIES)
                    / sum(float(ctx["weights"][f].square().sum()) for f in FAMILIES))
    row = {"method": method, **extra, "bits_per_weight": 8 * total / dense, "bytes": total, "bytes_by_part": parts,
           "rel_err": rel, **kl_top1(ctx["model"], ctx["ids"], ctx["reference"], args.window),
           "shape": fits["gate"].info}
    log.info("%-14s %-28s bits %6.3f  KL %.6f  top1 %.4f", method, json.dumps(extra)[:28], row["bits_per_weight"],
             row["kl"], row["top1"])
    return row


def quantizer_rows(ctx: dict, args) -> list[dict]:
    rows = []
    for method in ("rtn", "hqq", "gptq"):
        for bits in args.bits:
            for group in args.hqq_groups if method == "hqq" else args.groups:
                cfg = QuantConfig(method=method, bits=bits, group=group)
                t0 = time.perf_counter()
                fits = {f: quantized(ctx["weights"][f], cfg, ctx["hessians"] if method == "gptq" else None)
                        for f in FAMILIES}
                rows.append(score(ctx, method, fits, args, bits=bits, group=group,
                                  seconds=round(time.perf_counter() - t0, 2)))
    return rows


def globe_fit(ctx: dict, budget: float, args):
    import globe
    from globe.fit.config import ActivationConfig, BankConfig, TrainConfig
    cfg = globe.FitConfig(bank=BankConfig(budget=budget, families=FAMILIES),
                          train=TrainConfig(am_iters=args.am_iters),
                          activation=ActivationConfig(stats=ctx["stats"], steps=args.act_steps))
    return globe.fit_model(ctx["dir"], cfg)


def globe_rows(ctx: dict, budget: float, args) -> list[dict]:
    """GloBE at one budget, bf16 and stacked with quantization (a), (b), (c)."""
    t0 = time.perf_counter()
    result = globe_fit(ctx, budget, args)
    fit_s = round(time.perf_counter() - t0, 1)
    fams = result.families
    w, mom, hes = ctx["weights"], ctx["moments"], ctx["hessians"]
    rows = [score(ctx, "globe", {f: globe_bf16(fams[f]) for f in FAMILIES}, args, budget=budget, fit_seconds=fit_s)]
    for bits in (8, 4):
        cfg = QuantConfig(method="rtn", bits=bits, group=64)
        rows.append(score(ctx, "globe+after", {f: globe_after(fams[f], cfg) for f in FAMILIES}, args,
                          budget=budget, bits=bits, group=64))
    refits = {}
    for bits in (8, 4, 3):
        cfg = QuantConfig(method="gptq", bits=bits, group=64)
        refits[bits] = {f: globe_refit(fams[f], w[f], mom, cfg) for f in FAMILIES}
        rows.append(score(ctx, "globe+refit", refits[bits], args, budget=budget, bits=bits, group=64))
    bases = {"refit8": refits[8], "refit4": refits[4]}
    if budget <= 0.1:
        bases["bf16"] = {f: globe_bf16(fams[f]) for f in FAMILIES}
    dense = sum(w[f].numel() for f in FAMILIES)
    for base_name, base in bases.items():
        if 8 * sum(base[f].total_bytes for f in FAMILIES) / dense + 2.25 > MAX_RESIDUAL_BITS:
            continue                                        # beyond the sizes where quantizers are compared
        for bits, group in RESIDUALS:
            cfg = QuantConfig(method="gptq", bits=bits, group=group)
            fits = {f: residual(w[f], base[f], cfg, hes) for f in FAMILIES}
            rows.append(score(ctx, "globe+resid", fits, args, budget=budget, base=base_name, bits=bits, group=group))
    return rows


def svd_rows(ctx: dict, budget: float, args) -> list[dict]:
    """(c) without sharing: SVD-LLM (per-expert whitened SVD, bf16 factors) at `budget` + GPTQ of the residual."""
    from benchmarks.baselines.svd import whitened_svd
    rows = []
    for bits, group in RESIDUALS:
        cfg = QuantConfig(method="gptq", bits=bits, group=group)
        fits = {}
        for f in FAMILIES:
            peer = whitened_svd(ctx["weights"][f], ctx["hessians"].double(), budget)
            base = Compressed(peer.weights.to(torch.bfloat16).float(), {"factors": peer.params * 2}, peer.info)
            fits[f] = residual(ctx["weights"][f], base, cfg, ctx["hessians"])
        rows.append(score(ctx, "svd-llm+resid", fits, args, budget=budget, bits=bits, group=group))
    return rows


def frontier(rows: list[dict], methods: tuple[str, ...] = ("rtn", "hqq", "gptq")) -> list[tuple[float, float]]:
    """(bits, KL) of the quantizers' lower envelope: the best KL at or below each size."""
    pts = sorted((r["bits_per_weight"], r["kl"]) for r in rows if r["method"] in methods)
    out: list[tuple[float, float]] = []
    for bits, kl in pts:
        if not out or kl < out[-1][1]:
            out.append((bits, kl))
    return out


def best_quantizer_at(front: list[tuple[float, float]], bits: float) -> float | None:
    """Best quantizer KL at `bits`: log-linear interpolation on the envelope; None below its smallest size."""
    if not front or bits < front[0][0]:
        return None
    for (b0, k0), (b1, k1) in zip(front, front[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(k0) + t * math.log(k1))
    return front[-1][1]


def comparison(rows: list[dict]) -> list[dict]:
    """At each size of the quantizers' envelope: the best quantizer and the best GloBE-based row of at most that
    size (KL ratio < 1: GloBE is closer to the original at equal or fewer bytes)."""
    others = [r for r in rows if r["method"].startswith("globe")]
    out = []
    for bits, kl in frontier(rows):
        quant = min((r for r in rows if r["method"] in ("rtn", "hqq", "gptq") and r["bits_per_weight"] <= bits),
                    key=lambda r: r["kl"])
        fit = [r for r in others if r["bits_per_weight"] <= bits]
        best = min(fit, key=lambda r: r["kl"]) if fit else None
        out.append({"bits": bits, "quantizer": label(quant), "quantizer_kl": kl,
                    "globe": label(best) if best else None, "globe_bits": best and best["bits_per_weight"],
                    "globe_kl": best and best["kl"], "ratio": best and best["kl"] / kl})
    return out


def label(row: dict) -> str:
    return " ".join([row["method"]] + [f"{k}={row[k]}" for k in ("budget", "base", "bits", "group") if k in row])


def main(argv: list[str] | None = None) -> dict:
    from globe.core.files import atomic_write_text
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("globe").setLevel(logging.WARNING)                    # also silences globe's progress bars
    t_start = time.perf_counter()
    report = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()}, "models": []}
    out = Path(args.out)
    for model_dir in args.models:
        t0 = time.perf_counter()
        ctx = prepare(Path(model_dir), args)
        entry = {"model": ctx["info"], "rows": []}
        report["models"].append(entry)
        entry["rows"] += quantizer_rows(ctx, args)
        front = frontier(entry["rows"])
        for budget in args.budgets:
            entry["rows"] += globe_rows(ctx, budget, args)
            if budget <= 0.1:
                entry["rows"] += svd_rows(ctx, budget, args)
            for row in entry["rows"]:
                best = best_quantizer_at(front, row["bits_per_weight"])
                row["kl_over_best_quantizer"] = None if best is None else row["kl"] / best
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            atomic_write_text(out, json.dumps(report, indent=1, default=float))
        entry["quantizer_frontier"] = front
        entry["comparison"] = comparison(entry["rows"])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out, json.dumps(report, indent=1, default=float))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    for entry in report["models"]:
        print(f"\n{entry['model']['dir']}  ({entry['model']['split']}, {entry['model']['kl_tokens']} tokens)")
        for r in sorted(entry["rows"], key=lambda r: r["bits_per_weight"]):
            tag = " ".join(f"{k}={r[k]}" for k in ("budget", "base", "bits", "group") if k in r)
            ratio = r.get("kl_over_best_quantizer")
            print(f"  {r['method']:13} {tag:34} bits {r['bits_per_weight']:6.3f} KL {r['kl']:.6f} "
                  f"top1 {r['top1']:.4f}" + (f"  x best quantizer {ratio:.2f}" if ratio else ""))
        for c in entry.get("comparison", []):
            print(f"  at <= {c['bits']:.3f} bits: {c['quantizer']} KL {c['quantizer_kl']:.6f}; best GloBE-based "
                  + (f"{c['globe']} ({c['globe_bits']:.3f} bits) KL {c['globe_kl']:.6f} = {c['ratio']:.2f}x"
                     if c["globe"] else "none"))


if __name__ == "__main__":
    main()
