"""Design-shape run (issue 17): one family of a Qwen1.5-MoE-A2.7B-shaped checkpoint fitted at r = p/2, m = 256
with a few AM iterations and variable-projection evaluations, measured per phase (wall time, peak memory) next to
the dry run's prediction on the same device; the full model extrapolated from the measured per-iteration costs;
then the compress -> export -> load -> forward path on a loadable model with the same expert shapes.

    python benchmarks/design_shape.py --checkpoint /tmp/qwen15 --device cuda --am-iters 2 --varpro-steps 2 \
        --out benchmarks/results/design_shape_cuda.json
    python benchmarks/design_shape.py --checkpoint /tmp/qwen15 --layers 0 1 --device cpu ...   # reduced N

Sections of the JSON: "plan" (globe.fit.planning.plan on this device: GiB and seconds per phase), "fit" (measured: seconds
(wall, and this process's CPU time: compare that with the prediction on a shared CPU) and peak memory per
phase; CUDA: torch.cuda.max_memory_allocated reset at each phase, CPU: peak RSS so far),
"compare" (measured / predicted per phase), "extrapolated" (every family of the checkpoint at the default
iteration counts), "export" (with --export-model-layers L > 0: a transformers Qwen2-MoE with L layers and the
checkpoint's expert shapes is built, compressed with `globe fit` + `globe export` at the same (m, r), loaded, and
run forward once; seconds of each step and the logits' finiteness).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from globe.core.files import atomic_write_text
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig

log = logging.getLogger("benchmarks.design_shape")
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (benchmarks/make_upcycled.py)")
    p.add_argument("--out", default="benchmarks/results/design_shape.json", help="JSON written here")
    p.add_argument("--family", default="gate")
    p.add_argument("--layers", type=int, nargs="*", help="fit only these MoE layers (reduced N; default all)")
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--r", type=int, help="adapter rank (default p / 2)")
    p.add_argument("--init", default="hybrid", help="warm start (default hybrid, the fit's default)")
    p.add_argument("--am-iters", type=int, default=2)
    p.add_argument("--varpro-steps", type=int, default=2, help="L-BFGS iterations (evaluations: about one more)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", action="store_true",
                   help="CPU: also trace torch's allocations per phase (globe.fit.planning.estimate.traced_peak)")
    p.add_argument("--export-model-layers", type=int, default=0,
                   help="layers of the loadable model of the export section (0: skip it)")
    return p.parse_args(argv)


def config(args: argparse.Namespace, r: int, families: tuple[str, ...]) -> FitConfig:
    return FitConfig(bank=BankConfig(m=args.m, r=r, init=args.init, families=families),
                     sparsity=SparsityConfig(target_support=min(12, args.m)),
                     train=TrainConfig(am_iters=args.am_iters, varpro_steps=args.varpro_steps, tol=-1.0,
                                       device=args.device))


def peak_now(device: torch.device) -> int:
    """Peak bytes so far: CUDA max allocated, else peak RSS (Linux ru_maxrss is in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    """Resident bytes of this process now (Linux /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


@contextlib.contextmanager
def phase_probes(device: torch.device, record: dict, baseline: int = 0):
    """Listen to the engine's phases (globe.fit.engine.phases.listen, by the names the dry run predicts): seconds,
    this process's CPU seconds and peak memory per phase in `record` (CUDA peaks are reset at each phase start, so
    each phase reports its own peak; on the CPU the peak RSS so far is recorded)."""
    from globe.fit.engine.phases import listen
    started: dict[str, tuple[float, float]] = {}

    def on_phase(event: str, family: str, name: str, info: dict | None) -> None:
        if event == "start":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            started[name] = (time.perf_counter(), time.process_time())
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = started.pop(name)
        row = record.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_bytes": 0, "calls": 0})
        row["seconds"] += time.perf_counter() - t0
        row["cpu_seconds"] += time.process_time() - c0                     # this process's CPU time
        row["peak_bytes"] = max(row["peak_bytes"], peak_now(device) - baseline)
        row["calls"] += 1

    with listen(on_phase):
        yield record


def run_fit(args: argparse.Namespace, cfg: FitConfig) -> dict:
    """Fit one family (streamed from disk) with the phase probes; seconds and peaks per phase."""
    from globe.fit.engine import fit_family
    from globe.io import open_checkpoint
    device = torch.device(args.device)
    record: dict = {}
    baseline = rss_now() if device.type == "cpu" else 0
    t0 = time.perf_counter()
    with open_checkpoint(args.checkpoint) as reader:
        stack = reader.read_family(args.family, args.layers, lazy=True)
        with phase_probes(device, record, baseline):
            run = (fit_family, stack.weights, stack.ids, cfg, args.family, torch.Generator().manual_seed(0))
            if args.trace:
                from globe.fit.planning.estimate import traced_peak
                fam, traced, ranges = traced_peak(*run)
                for name, row in record.items():
                    row["traced_bytes"] = ranges.get(name, 0)
            else:
                fam, traced = run[0](*run[1:]), None
    total = time.perf_counter() - t0
    am = fam.history.get("am", [])
    return {"n": int(stack.weights.shape[0]), "seconds_total": round(total, 1), "phases": record,
            "am_seconds_per_iteration": [round(s["seconds"], 2) for s in am],
            "varpro_evaluations": len(fam.history.get("varpro", [])), "rel_err": fam.metrics["rel_err"],
            "median_support": fam.metrics["median_support"], "params": fam.metrics["params"],
            "peak_bytes": peak_now(device) - baseline, "rss_baseline_bytes": baseline, "traced_peak_bytes": traced,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def compare(plan_family: dict, fit: dict) -> dict:
    """measured / predicted seconds and peak bytes per phase (CPU peaks: RSS so far, so compare the maximum)."""
    out = {}
    for name, row in fit["phases"].items():
        mem, sec = plan_family["memory"].get(name, 0), plan_family["seconds"].get(name, 0.0)
        cpu = row.get("cpu_seconds")
        out[name] = {"seconds_measured": round(row["seconds"], 1), "seconds_predicted": round(sec, 1),
                     "time_ratio": round(row["seconds"] / sec, 2) if sec else None,
                     "cpu_seconds_measured": None if cpu is None else round(cpu, 1),
                     "cpu_time_ratio": round(cpu / sec, 2) if sec and cpu is not None else None,
                     "peak_gib_measured": round(row["peak_bytes"] / 2**30, 2), "peak_gib_predicted": round(mem / 2**30, 2)}
        if "traced_bytes" in row:
            out[name]["traced_gib"] = round(row["traced_bytes"] / 2**30, 2)
    out["peak"] = {"gib_measured": round(fit["peak_bytes"] / 2**30, 2),
                   "gib_predicted": round(plan_family["memory"]["peak"] / 2**30, 2)}
    return out


def extrapolate(fit: dict, plan: dict, families: int, n_full: int, am_iters: int = 30, evaluations: int = 101) -> dict:
    """Seconds of every family at the default iteration counts, from the measured per-iteration costs (scaled by
    n_full / n where the run fitted fewer experts)."""
    ph, scale = fit["phases"], n_full / fit["n"]
    am_iter = sum(fit["am_seconds_per_iteration"]) / max(len(fit["am_seconds_per_iteration"]), 1)
    per_eval = ph.get("varpro", {}).get("seconds", 0.0) / max(fit["varpro_evaluations"], 1)
    fixed = sum(ph.get(k, {}).get("seconds", 0.0) for k in ("normalize", "warm_start", "finalize"))
    family = scale * (fixed + am_iters * am_iter + evaluations * per_eval)
    return {"families": families, "am_iters": am_iters, "varpro_evaluations": evaluations,
            "seconds_per_family": round(family, 1), "hours_total": round(families * family / 3600, 2),
            "predicted_hours_total_by_plan": round(plan["seconds"] / 3600, 2) if plan else None}


def loadable_model(dir_: Path, layers: int, p: int, d: int, experts: int) -> Path:
    """A random transformers Qwen2-MoE with the checkpoint's expert shapes and `layers` layers, saved in bf16."""
    import transformers
    cfg = transformers.Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=p, intermediate_size=4 * p,
                                      shared_expert_intermediate_size=4 * p, num_experts=experts,
                                      num_experts_per_tok=4, num_hidden_layers=layers, num_attention_heads=16,
                                      num_key_value_heads=16, vocab_size=1024, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dir_)
    return dir_


def run_export(args: argparse.Namespace, work: Path, p: int, d: int, experts: int, r: int) -> dict:
    """globe fit + globe export (CLI, public contract) of a loadable model at (m, r), then load and forward."""
    from globe.cli.main import main as globe_main
    out, t = {}, time.perf_counter()
    model_dir = loadable_model(work / "model", args.export_model_layers, p, d, experts)
    cfg = config(args, r, ("gate", "up"))
    out["build_seconds"] = round(time.perf_counter() - t, 1)
    steps = [("fit", ["fit", str(model_dir), "-o", str(work / "art"), "--m", str(args.m), "--r", str(r),
                      "--am-iters", str(args.am_iters), "--varpro-steps", str(args.varpro_steps), "--device",
                      args.device, "--init", args.init, "--target-support", str(cfg.sparsity.target_support)]),
             ("export", ["export", str(work / "art"), "--model", str(model_dir), "-o", str(work / "hf")])]
    for name, argv in steps:
        t = time.perf_counter()
        out[f"{name}_exit"] = globe_main(argv)
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        if out[f"{name}_exit"]:
            return out
    t = time.perf_counter()
    model, out["loader"] = load_any(work / "hf", args.device)
    out["load_seconds"] = round(time.perf_counter() - t, 1)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.no_grad():
        model(ids)                                                          # warm-up (composition, caches)
        t = time.perf_counter()
        logits = model(ids).logits
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    out.update(forward_seconds=round(time.perf_counter() - t, 3), logits_shape=list(logits.shape),
               logits_finite=bool(torch.isfinite(logits).all()))
    return out


def load_any(path: Path, device: str):
    """The HF path (AutoModelForCausalLM.from_pretrained after `import globe`) where globe registers it, else
    globe.load_compressed."""
    import globe
    try:
        from globe.export import hf_quantizer  # noqa: F401  (present once the HF integration is merged)
        import transformers
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device), "transformers"
    except ImportError:
        return globe.load_compressed(path, device=device), "globe.load_compressed"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from globe.fit.planning.plan import plan_fit
    from globe.fit.planning.timing import KernelRates
    from globe.io import open_checkpoint
    with open_checkpoint(args.checkpoint) as reader:
        inv = reader.inventory()
    r = args.r or inv.p // 2
    cfg = config(args, r, (args.family,))
    result: dict = {"torch": torch.__version__, "checkpoint": str(args.checkpoint), "m": args.m, "r": r,
                    "layers": args.layers, "config": cfg.to_dict()["train"]}
    t = time.perf_counter()
    plan = plan_fit(args.checkpoint, cfg)
    result["plan_seconds"] = round(time.perf_counter() - t, 1)
    n_full = len(inv.moe_layers) * inv.num_experts
    if args.layers:                                                      # plan the reduced family that is fitted
        from globe.fit.planning.estimate import FitShape, phase_bytes
        from globe.fit.planning.timing import phase_seconds
        n = len(args.layers) * inv.num_experts
        shape = FitShape.from_config(cfg, n, inv.p, inv.d, args.m, r, inv.dtype, args.device)
        from globe.fit.planning.plan import artifact_bytes, family_params
        fam = plan.families[0]
        fam.n, fam.memory = n, phase_bytes(shape)
        fam.params = family_params(n, inv.p, inv.d, args.m, r, cfg.sparsity.target_support)
        fam.artifact_bytes = artifact_bytes(fam.params, n)
        fam.seconds = phase_seconds(shape, KernelRates.from_dict(plan.rates))
    result["plan"] = plan.to_dict()
    log.info("plan:\n%s", plan.table())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: atomic_write_text(out, json.dumps(result, indent=1))     # noqa: E731  (after each section)
    save()
    result["fit"] = run_fit(args, cfg)
    result["compare"] = compare(result["plan"]["families"][0], result["fit"])
    full = plan_fit(args.checkpoint, FitConfig(bank=BankConfig(m=args.m, r=r, families=("gate", "up", "down")),
                                               sparsity=cfg.sparsity, train=TrainConfig(device=args.device)),
                    rates=KernelRates.from_dict(plan.rates))
    result["extrapolated"] = extrapolate(result["fit"], full.to_dict(), 3, n_full)
    save()
    if args.export_model_layers:
        import tempfile
        with tempfile.TemporaryDirectory() as work:
            result["export"] = run_export(args, Path(work), inv.p, inv.d, inv.num_experts, r)
        save()
    print(json.dumps({k: result[k] for k in ("compare", "extrapolated", *(("export",) if "export" in result else ()))},
                     indent=1))


if __name__ == "__main__":
    sys.exit(main())
