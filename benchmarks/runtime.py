"""Runtime benchmark: perplexity, decode/prefill tokens/s and cache hit rates of GloBE-compressed models.

On the embedded model (default) it fits banks that cut the model's TOTAL parameters by about each --reductions
(only the routed gate/up projections shrink, so the per-family budget is chosen to give that total), then reports
the held-out perplexity of the original and of each compressed model, decode tokens/s of the original vs the
`cached`, `factored` and `dense` runtimes (interleaved rounds; median and best), and the decode-time cache hit rate
(held-out tokens fed one by one through the KV cache) after warm-up at several capacities. Two controls put the
perplexities in context: routed gate/up zeroed, and Gaussian noise of the same relative error as the -25 % fit.
Writes JSON (default benchmarks/results/runtime.json).

    python benchmarks/runtime.py                            # waits for the embedded model if it is not there yet
    python benchmarks/runtime.py --reductions 0.25 --rounds 1 --ppl-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from globe.assets import DEFAULT_MODEL_DIR
from globe.core.files import atomic_write_text
from globe.eval import decode_hit_rate, decode_speed, encode_text, perplexity, prefill_speed, routed_footprint
from globe.export import load_model
from globe.fit.solvers.budget import total_cut_budget
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_model
from globe.io import open_checkpoint
from globe.runtime import apply_globe, collect_routing_counts, experts_modules, globe_modules, warm_up

log = logging.getLogger("benchmarks.runtime")
REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: the embedded model)")
    a("--text", default=str(DEFAULT_MODEL_DIR / "heldout.txt"), help="held-out text for perplexity")
    a("--calib", default=str(REPO / "corpus" / "train.txt"),
      help="calibration text for routing counts / cache warm-up (default corpus/train.txt; else start of --text)")
    a("--calib-tokens", type=int, default=4096, help="calibration tokens for the warm-up (default 4096)")
    a("--reductions", type=float, nargs="+", default=[0.25, 0.40], help="target cuts of TOTAL params")
    a("--target-support", type=int, default=8, help="target median support (lowered when the budget needs it)")
    a("--am-iters", type=int, default=20, help="AM iterations of each fit (default 20)")
    a("--varpro-steps", type=int, default=30, help="variable-projection evaluations of each fit (default 30)")
    a("--capacities", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16], help="cache sizes for the hit-rate sweep")
    a("--cache-size", type=int, help="cache size of the timed cached runtime (default: half the experts)")
    a("--ppl-tokens", type=int, default=0, help="score only the first N held-out tokens (default 0: all)")
    a("--hit-tokens", type=int, default=512, help="held-out tokens decoded one by one per hit-rate measurement")
    a("--window", type=int, default=256, help="perplexity window (non-overlapping)")
    a("--decode-tokens", type=int, default=64, help="greedy new tokens per decode timing")
    a("--prefill-tokens", type=int, default=256, help="prompt tokens of the prefill timing")
    a("--rounds", type=int, default=5, help="interleaved timing rounds (median and best reported)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype (default: stored)")
    a("--wait", type=float, default=3600, help="seconds to wait for the model files to appear (default 3600)")
    a("--out", default=str(REPO / "benchmarks" / "results" / "runtime.json"), help="JSON output path")
    return p.parse_args()


def wait_for_model(model_dir: Path, timeout: float, poll: float = 30.0) -> None:
    """Block until model_dir holds a readable checkpoint (a colleague may still be writing it)."""
    deadline = time.monotonic() + timeout
    while True:
        if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
            try:
                open_checkpoint(model_dir).close()
                return
            except Exception as exc:  # noqa: BLE001 - half-written files raise many kinds of errors
                log.info("checkpoint not readable yet (%s)", exc)
        if time.monotonic() > deadline:
            raise SystemExit(f"no readable checkpoint in {model_dir} after {timeout:.0f} s")
        log.info("waiting for %s ...", model_dir)
        time.sleep(poll)


def fit_for(model_dir: Path, reduction: float, inv, args) -> tuple[object, dict]:
    budget, support = total_cut_budget(reduction, inv, ("gate", "up"), args.target_support)
    cfg = FitConfig(bank=BankConfig(budget=budget), sparsity=SparsityConfig(target_support=support),
                    train=TrainConfig(am_iters=args.am_iters, varpro_steps=args.varpro_steps))
    t0 = time.perf_counter()
    result = fit_model(model_dir, cfg)
    saved = sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families)
    info = {"target_total_reduction": reduction, "budget_per_family": round(budget, 5), "target_support": support,
            "fit_seconds": round(time.perf_counter() - t0, 1), "total_params": inv.total_params - saved,
            "total_reduction": saved / inv.total_params,
            "families": {f: {"m": fam.shape["m"], "r": fam.shape["r"], "rel_err": fam.metrics["rel_err"],
                             "median_support": fam.metrics["median_support"],
                             "params_ratio": fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"]}
                         for f, fam in result.families.items()}}
    log.info("-%.0f%% total: budget %.4f, %s", 100 * reduction, budget, info["families"])
    return result, info


def patched(model_dir: Path, result, mode: str, dtype, cache_size, counts) -> torch.nn.Module:
    model = apply_globe(load_model(model_dir, dtype), result, mode=mode, cache_size=cache_size)
    if mode == "cached":
        warm_up(model, counts)
    return model


def hit_rate(model, ids: torch.Tensor, args) -> float:
    """Decode-time cache hit rate over held-out ids (teacher-forced, one token per step)."""
    return decode_hit_rate(model, ids, args.hit_tokens, args.window)["hit_rate"]


@torch.no_grad()
def controls(model_dir: Path, dtype, ppl_ids: torch.Tensor, rel_err: float, args) -> dict:
    """Perplexity with routed gate/up zeroed, and with Gaussian noise of relative Frobenius error `rel_err`."""
    zeroed, noisy = load_model(model_dir, dtype), load_model(model_dir, dtype)
    gen = torch.Generator().manual_seed(0)
    for module in experts_modules(zeroed).values():
        module.gate_up_proj.zero_()
    for module in experts_modules(noisy).values():
        w = module.gate_up_proj
        rms = w.float().square().mean(dim=(1, 2), keepdim=True).sqrt()            # per expert
        w.add_((torch.randn(w.shape, generator=gen) * rms * rel_err).to(w.dtype))
    return {"routed_gate_up_zeroed": perplexity(zeroed, ppl_ids, args.window)["perplexity"],
            "gaussian_noise": {"rel_err": rel_err,
                               "perplexity": perplexity(noisy, ppl_ids, args.window)["perplexity"]}}


def timed_rounds(models: dict[str, torch.nn.Module], ids: torch.Tensor, args) -> dict[str, dict]:
    """Prefill / decode tokens/s per model over interleaved rounds: median and best (the machine is shared, so the
    best round is the closest to the intrinsic speed)."""
    samples: dict[str, dict[str, list]] = {name: {"prefill": [], "decode": []} for name in models}
    for round_ in range(args.rounds):
        for name, model in models.items():
            samples[name]["prefill"].append(prefill_speed(model, ids[:args.prefill_tokens], 2)["prefill_tok_s"])
            samples[name]["decode"].append(decode_speed(model, ids[:16], args.decode_tokens, 2)["decode_tok_s"])
        log.info("timing round %d/%d done", round_ + 1, args.rounds)
    return {name: {"prefill_tok_s": statistics.median(s["prefill"]), "prefill_tok_s_best": max(s["prefill"]),
                   "decode_tok_s": statistics.median(s["decode"]), "decode_tok_s_best": max(s["decode"]),
                   "decode_samples": [round(x, 1) for x in s["decode"]]} for name, s in samples.items()}


def compressed_row(model_dir: Path, fit: tuple, dtype, counts: dict, ppl_ids: torch.Tensor, original_ppl: float,
                   args) -> tuple[dict, dict[str, torch.nn.Module]]:
    """Perplexity, footprint and hit rate of one fit (cached runtime), plus its models in every mode."""
    result, info = fit
    models = {mode: patched(model_dir, result, mode, dtype, args.cache_size, counts)
              for mode in ("cached", "factored", "dense")}
    info["footprint"] = routed_footprint(models["cached"])
    info["perplexity"] = perplexity(models["cached"], ppl_ids, args.window)
    info["ppl_ratio"] = info["perplexity"]["perplexity"] / original_ppl
    short = ppl_ids[:2 * args.window]
    info["modes_agree_ppl"] = {m: perplexity(model, short, args.window)["perplexity"] for m, model in models.items()}
    info["cache_size"] = min(m.cache.capacity for m in globe_modules(models["cached"]).values())
    info["decode_hit_rate_after_warm_up"] = hit_rate(models["cached"], ppl_ids, args)
    log.info("-%.0f%% total: perplexity %.4f (x%.3f), hit rate %.3f", 100 * info["target_total_reduction"],
             info["perplexity"]["perplexity"], info["ppl_ratio"], info["decode_hit_rate_after_warm_up"])
    return info, models


def header(model_dir: Path, inv, original, calib_source: str, calib: torch.Tensor, args) -> dict:
    return {"model": {"dir": str(model_dir), "model_type": inv.model_type, "dtype": str(original.dtype),
                      "total_params": inv.total_params, "routed_gate_params": inv.params["gate"],
                      "routed_up_params": inv.params["up"], "moe_layers": len(inv.moe_layers),
                      "experts": inv.num_experts, "top_k": inv.top_k, "p": inv.p, "d": inv.d},
            "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
            "calibration": {"source": calib_source, "tokens": int(calib.numel())},
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine()}}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    model_dir = Path(args.model)
    wait_for_model(model_dir, args.wait)
    t_start = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    original = load_model(model_dir, dtype)
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = encode_text(tokenizer, Path(args.text).read_text(encoding="utf-8"))
    ppl_ids = ids[:args.ppl_tokens] if args.ppl_tokens else ids
    calib_path = Path(args.calib)
    calib = (encode_text(tokenizer, calib_path.read_text(encoding="utf-8")[:50 * args.calib_tokens])
             if calib_path.is_file() else ids)[:args.calib_tokens]
    counts = collect_routing_counts(original, calib, window=args.window)
    report = header(model_dir, inv, original, str(calib_path) if calib_path.is_file() else "held-out prefix",
                    calib, args)
    report["original"] = {"perplexity": perplexity(original, ppl_ids, args.window)}
    log.info("original perplexity %.4f", report["original"]["perplexity"]["perplexity"])
    fits = [fit_for(model_dir, r, inv, args) for r in args.reductions]
    report["compressed"], timed = [], {"original": original}
    for fit in fits:
        info, models = compressed_row(model_dir, fit, dtype, counts, ppl_ids,
                                      report["original"]["perplexity"]["perplexity"], args)
        report["compressed"].append(info)
        timed.update({f"{mode} -{100 * info['target_total_reduction']:.0f}%": m for mode, m in models.items()})
    report["speed"] = timed_rounds(timed, ids, args)
    report["hit_rate_vs_capacity"] = sweep(model_dir, fits[0], dtype, counts, ppl_ids, args)
    rel_err = statistics.mean(f["rel_err"] for f in fits[0][1]["families"].values())
    report["controls"] = controls(model_dir, dtype, ppl_ids, rel_err, args)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(Path(args.out), json.dumps(report, indent=1, default=float))
    log.info("wrote %s in %.0f s", args.out, report["seconds"])


def sweep(model_dir: Path, fit: tuple, dtype, counts: dict, ids: torch.Tensor, args) -> dict:
    """Decode-time hit rate for each cache capacity, warmed up from calibration counts and cold (empty cache)."""
    result, info = fit
    rows = []
    for capacity in args.capacities:
        warm = patched(model_dir, result, "cached", dtype, capacity, counts)
        cold = apply_globe(load_model(model_dir, dtype), result, mode="cached", cache_size=capacity)
        rows.append({"capacity": capacity, "hit_rate_warm": hit_rate(warm, ids, args),
                     "hit_rate_cold": hit_rate(cold, ids, args)})
        log.info("capacity %d: decode hit rate %.3f warm, %.3f cold", capacity, rows[-1]["hit_rate_warm"],
                 rows[-1]["hit_rate_cold"])
    return {"target_total_reduction": info["target_total_reduction"], "tokens": min(args.hit_tokens, ids.numel()),
            "experts": next(iter(globe_modules(warm).values())).num_experts, "rows": rows}


if __name__ == "__main__":
    main()
