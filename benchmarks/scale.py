"""Scale benchmark: memory and speed of fitting one family of a large checkpoint, and AM-loop throughput against
the measured matmul peak. Writes (merges into) benchmarks/results/scale.json; each section can be run alone.

    python benchmarks/scale.py --peak                                         # fp32 / bf16 matmul peaks
    python benchmarks/scale.py --profile --shape 32 1408 2048 352 64          # one AM pass, fp32 vs bf16 products
    python benchmarks/scale.py --fit /tmp/qwen15 --family gate --m 64 --r 128 --am-iters 2 --varpro-steps 1
    python benchmarks/scale.py --fit /tmp/qwen15 --procs 1 2                  # needs globe.fit.parallel.comm

Sections: "peak" (GFLOP/s of a 2048^3 matmul and of the loop's batched shape, fp32 and bf16), "profile" (per
precision: seconds of one AM pass, torch.profiler top ops with GFLOP/s, the dominant kernels timed alone against
the peak of their dtype), "fit" (peak RSS, seconds per phase and per AM iteration, varpro evaluations), and
"processes" (1 vs K process timings: filled by globe.fit.parallel.comm.scale_benchmark(model_dir, cfg, family,
procs) -> dict when that module provides it; otherwise the section says it is unavailable).
Time it with the thread count you report (OMP_NUM_THREADS); the JSON records it.
"""
from __future__ import annotations

import argparse
import sys
import json
import logging
import resource
import time
from pathlib import Path

import torch

from globe.core.files import atomic_write_text
from globe.fit.solvers.am import AMOptions, AMState, am_pass
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.planning.estimate import FitShape, gib, phase_bytes
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions
from globe.fit.warm_starts.base import warm_start
from globe.fit.warm_starts.targets import aligned_targets

log = logging.getLogger("benchmarks.scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/scale.json", help="JSON file (sections are merged in)")
    p.add_argument("--peak", action="store_true", help="measure fp32 / bf16 matmul peaks")
    p.add_argument("--profile", action="store_true", help="profile one AM pass at --shape, fp32 vs bf16 products")
    p.add_argument("--shape", type=int, nargs=5, default=[32, 1408, 2048, 352, 64], metavar=("N", "P", "D", "R", "M"),
                   help="synthetic family for --profile (default: 32 Qwen1.5-MoE-shaped experts, r=352, m=64)")
    p.add_argument("--fit", metavar="MODEL_DIR", help="fit one family of this checkpoint and record RSS / timings")
    p.add_argument("--family", default="gate", help="family to fit (gate)")
    p.add_argument("--m", type=int, default=64, help="atoms (64)")
    p.add_argument("--r", type=int, default=128, help="adapter rank (128)")
    p.add_argument("--target-support", type=int, default=12, help="target median support (12)")
    p.add_argument("--init", default="svd", help="warm start (svd: streams bf16 targets)")
    p.add_argument("--am-iters", type=int, default=2, help="AM iterations (2)")
    p.add_argument("--varpro-steps", type=int, default=1, help="variable-projection L-BFGS iterations (1)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="train.precision")
    p.add_argument("--chunk-size", type=int, default=64, help="experts per chunk (64)")
    p.add_argument("--procs", type=int, nargs="*", help="process counts for the distributed section (e.g. 1 2)")
    p.add_argument("--proc-problem", type=int, nargs=6, default=[256, 256, 512, 32, 32, 4],
                   metavar=("N", "P", "D", "M", "R", "K"), help="planted problem of the distributed section")
    p.add_argument("--threads-per-proc", type=int, default=1, help="CPU threads of each process (1)")
    p.add_argument("--device", default="cpu", help="fit device: cpu | cuda (timings and CUDA peak memory)")
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gflops(fn, flops: float, reps: int = 3) -> float:
    """Best-of-`reps` GFLOP/s of fn() (one warm-up call first)."""
    fn()
    best = min(_timed(fn) for _ in range(reps))
    return flops / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_peak(p: int = 1408, d: int = 2048, r: int = 352) -> dict:
    """GFLOP/s of a 2048^3 matmul and of a batched [8, p, d] @ [8, d, r] product, in fp32 and bf16."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, generator=gen).to(dtype), torch.randn(2048, 2048, generator=gen).to(dtype)
        x, y = torch.randn(8, p, d, generator=gen).to(dtype), torch.randn(8, d, r, generator=gen).to(dtype)
        square = gflops(lambda: a @ b, 2 * 2048**3)
        batched = gflops(lambda: x @ y, 2 * 8 * p * d * r)
        out[name] = {"square_2048": round(square, 1), f"bmm_8x{p}x{d}x{r}": round(batched, 1),
                     "peak": round(max(square, batched), 1)}
    out["threads"] = torch.get_num_threads()
    return out


def synthetic_family(n: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, p, d] bf16 experts sharing a 256-dim row space plus isotropic noise (upcycled-like)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(min(256, d), d, generator=gen)
    return (torch.randn(n, p, basis.shape[0], generator=gen) @ basis / basis.shape[0] ** 0.5
            + 0.5 * torch.randn(n, p, d, generator=gen)).bfloat16()


def kernel_rates(p: int, d: int, r: int, k: int, c: int = 8, rounds: int = 3) -> dict:
    """The loop's dominant products timed alone at its shapes, interleaved with the square-matmul peak of the same
    dtype (best of `rounds`, so that load from other processes hits both alike): GFLOP/s and % of that peak."""
    gen = torch.Generator().manual_seed(1)
    w, mixed, adapters = (torch.randn(c, p, d, generator=gen), torch.randn(c, r, d, generator=gen),
                          torch.randn(c, p, r, generator=gen))
    grams, atoms = torch.randn(c, 1, r, r, generator=gen), torch.randn(c, k, r, d, generator=gen)
    sq = torch.randn(2048, 2048, generator=gen)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wl, ml, al, gl, bl, ql = (t.to(dtype) for t in (w, mixed, adapters, grams, atoms, sq))
        work = {"peak (2048^3 matmul)": (lambda: ql @ ql, 2 * 2048**3),
                "W M^T (adapter cross term)": (lambda: wl @ ml.transpose(1, 2), 2 * c * p * d * r),
                "A^T W (coding / MOD rhs)": (lambda: al.transpose(1, 2) @ wl, 2 * c * r * p * d),
                "G_i B_a (support Gram)": (lambda: gl @ bl, 2 * c * k * r * r * d)}
        best = {key: 0.0 for key in work}
        for _ in range(rounds):
            for key, (fn, flops) in work.items():
                best[key] = max(best[key], gflops(fn, flops, reps=1))
        peak = best.pop("peak (2048^3 matmul)")
        out[name] = {"peak_gflops": round(peak, 1)} | {
            key: {"gflops": round(v, 1), "pct_of_peak": round(100 * v / peak, 1)} for key, v in best.items()}
    return out


def profiled(fn) -> tuple[object, dict]:
    """fn() under torch.profiler: (its result, seconds, top ops, GFLOP/s of the ops with a flop count)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops = {}
    for e in events[:10]:
        sec = e.self_cpu_time_total / 1e6
        ops[e.key] = {"calls": e.count, "seconds": round(sec, 3), "share": round(sec / seconds, 3)}
        if e.flops:
            ops[e.key].update(gflop=round(e.flops / 1e9, 1), gflops=round(e.flops / 1e9 / max(sec, 1e-9), 1))
    flops = sum(e.flops for e in events if e.flops)
    mm_seconds = sum(e.self_cpu_time_total for e in events if e.flops) / 1e6
    return value, {"seconds": round(seconds, 2), "matmul_gflop": round(flops / 1e9, 1),
                   "matmul_seconds": round(mm_seconds, 2),
                   "matmul_gflops": round(flops / 1e9 / max(mm_seconds, 1e-9), 1),
                   "loop_gflops": round(flops / 1e9 / seconds, 1), "top_ops": ops}


def run_profile(shape: list[int], rounds: int = 2) -> dict:
    """One AM pass and 2 variable-projection L-BFGS iterations per precision from the same state: wall time best
    of `rounds` (interleaved), then one torch.profiler run each for the op breakdown and matmul GFLOP/s."""
    from globe.fit.solvers.varpro import varpro_refine
    n, p, d, r, m = shape
    weights = synthetic_family(n, p, d)
    norm = Normalizer.fit(weights)
    cfgs = {prec: FitConfig(bank=BankConfig(m=m, r=r, init="svd"),
                            sparsity=SparsityConfig(target_support=min(12, m // 2)),
                            train=TrainConfig(chunk_size=16, precision=prec)) for prec in ("fp32", "bf16")}
    bank, codes, temp = warm_start(aligned_targets(weights, norm, r, 16), m, cfgs["fp32"],
                                   torch.Generator().manual_seed(0))
    start = AMState(bank=bank, codes=codes, temperature=temp)
    am_pass(SolverProblem(weights, norm), start, AMOptions.from_config(cfgs["fp32"]))   # codes from the weighted coder

    def one_pass(prec: str) -> dict:
        return am_pass(SolverProblem(weights, norm),
                       AMState(bank=start.bank, codes=start.codes, temperature=start.temperature),
                       AMOptions.from_config(cfgs[prec]))

    best = {prec: float("inf") for prec in cfgs}
    for _ in range(rounds):
        for prec in cfgs:
            best[prec] = min(best[prec], _timed(lambda: one_pass(prec)))
    out = {"shape": dict(n=n, p=p, d=d, r=r, m=m), "am_pass_seconds_best": {k: round(v, 2) for k, v in best.items()},
           "am_pass_speedup": round(best["fp32"] / best["bf16"], 2)}
    for prec, cfg in cfgs.items():
        stats, am = profiled(lambda: one_pass(prec))
        am.update(rel_err=stats["rel_err"], median_support=stats["median_support"],
                  matmul_gflops_at_best_time=round(am["matmul_gflop"] / best[prec], 1))
        (_, _, losses), varpro = profiled(lambda: varpro_refine(
            SolverProblem(weights, norm), Factors(start.bank, start.codes, start.temperature),
            VarProOptions.from_config(cfg, 2)))
        varpro.update(evaluations=len(losses), seconds_per_evaluation=round(varpro["seconds"] / len(losses), 2),
                      rel_err=losses[-1])
        out[prec] = {"am_pass": am, "varpro": varpro}
        log.info("%s: AM pass %.1f s (best), varpro %.1f s / evaluation", prec, best[prec],
                 varpro["seconds_per_evaluation"])
    out["kernels"] = kernel_rates(p, d, r, k=4 * min(12, m // 2) + 4)
    return out


def fit_config(args: argparse.Namespace) -> FitConfig:
    return FitConfig(bank=BankConfig(m=args.m, r=args.r, init=args.init, families=(args.family,)),
                     sparsity=SparsityConfig(target_support=args.target_support),
                     train=TrainConfig(am_iters=args.am_iters, varpro_steps=args.varpro_steps, tol=-1.0,
                                       chunk_size=args.chunk_size, precision=args.precision, device=args.device))


def run_fit(args: argparse.Namespace) -> dict:
    """Fit one family of args.fit, streaming the experts from disk; peak RSS and timings."""
    from globe.io import open_checkpoint
    cfg = fit_config(args)
    t0 = time.perf_counter()
    with open_checkpoint(args.fit) as reader:
        stack = reader.read_family(args.family, lazy=True)
        n, p, d = stack.weights.shape
        rss_open = peak_rss_gib()
        fam = fit_family(stack.weights, stack.ids, cfg, args.family, torch.Generator().manual_seed(cfg.train.seed))
    total = time.perf_counter() - t0
    am = fam.history.get("am", [])
    timings = {k: v["seconds"] for k, v in fam.metrics["timings"].items()}
    return {"model_dir": str(args.fit), "family": args.family, "n": n, "p": p, "d": d, "m": args.m, "r": args.r,
            "dtype": str(stack.weights.dtype).removeprefix("torch."), "family_gib_in_stored_dtype":
            round(stack.weights.nbytes() / 2**30, 2) if hasattr(stack.weights, "nbytes") else None,
            "config": cfg.to_dict()["train"], "threads": torch.get_num_threads(),
            "peak_rss_gib": round(peak_rss_gib(), 2), "rss_after_open_gib": round(rss_open, 2),
            "device": torch.cuda.get_device_name() if cfg.train.device.startswith("cuda") else "cpu",
            "cuda_peak_gib": round(max(v["peak_mem_mb"] for v in fam.metrics["timings"].values()) / 2**10, 2)
            if cfg.train.device.startswith("cuda") else None,     # the largest phase's (each phase resets the peak)
            "seconds_total": round(total, 1), "seconds_per_phase": timings,
            "am_seconds_per_iteration": [round(s["seconds"], 1) for s in am],
            "varpro_evaluations": len(fam.history.get("varpro", [])),
            "varpro_seconds": round(timings.get("varpro", 0.0), 1),
            "rel_err": fam.metrics["rel_err"], "am_rel_err": [s["rel_err"] for s in am],
            "median_support": fam.metrics["median_support"],
            "memory_model_gib": memory_model(n, p, d, args.r, args.m, args.chunk_size, init=cfg.bank.init,
                                             am_iters=cfg.train.am_iters, varpro_steps=cfg.train.varpro_steps),
            "memory_model_gib_at_r704_m256": memory_model(n, p, d, 704, 256, args.chunk_size, init="hybrid")}


def memory_model(n: int, p: int, d: int, r: int, m: int, chunk: int = 64, stored_bytes: int = 2,
                 **settings) -> dict:
    """Predicted peak GiB of each phase of fit_family (globe.fit.planning.estimate; svd init and the reader's streaming
    unless `settings` (FitShape fields) say otherwise) and their maximum."""
    shape = FitShape(n=n, p=p, d=d, r=r, m=m, chunk=chunk, stored_bytes=stored_bytes,
                     **({"init": "svd"} | settings))
    return {k: gib(v) for k, v in phase_bytes(shape).items()}


def run_processes(args: argparse.Namespace) -> dict:
    """1 vs K gloo processes on the planted problem of benchmarks/distributed.py (time_processes), at the sizes
    given by --proc-problem, `--threads-per-proc` threads each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from distributed import time_processes
    n, p, d, m, r, k = args.proc_problem
    cfg = FitConfig(bank=BankConfig(m=m, r=r), sparsity=SparsityConfig(target_support=k),
                    train=TrainConfig(am_iters=4, tol=-1.0, varpro_steps=6, device=args.device))
    return {"problem": dict(n=n, p=p, d=d, m=m, r=r, k=k),
            **time_processes(dict(n=n, p=p, d=d, m=m, r=r, k=k), cfg, tuple(args.procs), args.threads_per_proc)}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["torch"] = torch.__version__
    if args.peak or args.profile:
        result["peak"] = measure_peak(args.shape[1], args.shape[2], args.shape[3])
        log.info("peak: %s", result["peak"])
    if args.profile:
        result["profile"] = run_profile(args.shape)
    if args.procs:
        result["processes"] = run_processes(args)
    if args.fit:
        result["fit"] = run_fit(args)
        log.info("fit: %s", result["fit"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))


if __name__ == "__main__":
    main()
