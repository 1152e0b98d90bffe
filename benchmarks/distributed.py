"""Distributed-fit benchmark: one family of a synthetic planted problem fitted by 1 process and by 2 processes
joined by gloo on this machine (torch.multiprocessing spawn, `--threads` CPU threads each), timed inside the
processes (process start and group set-up excluded): wall seconds, CPU seconds (sum over processes and of the
busiest one: on an idle machine wall ~ busiest CPU) and rank 0's time inside collectives (waits included).
Writes JSON (default benchmarks/results/distributed.json).

    python benchmarks/distributed.py                          # N=256 experts of 256 x 512, m=32, r=32
    python benchmarks/distributed.py --experts 128 --p 128 --d 256 --am-iters 6 --varpro-steps 10 --repeats 3

`time_processes(...)` is the function a larger benchmark (benchmarks/scale.py) can call.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from globe.core.files import atomic_write_text
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.parallel.comm import Comm, run_local

log = logging.getLogger("benchmarks.distributed")


def planted(n: int, p: int, d: int, m: int, r: int, k: int, noise: float = 0.05, seed: int = 0):
    """W_i = A_i (sum_j alpha_ij B_j) + noise: weights [n, p, d], ids [n, 2] (16 experts per layer)."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, r, d, generator=gen)
    codes = torch.zeros(n, m)
    picks = torch.rand(n, m, generator=gen).argsort(1)[:, :k]                       # k distinct atoms per expert
    codes[torch.arange(n)[:, None], picks] = torch.rand(n, k, generator=gen) + 0.5
    weights = torch.randn(n, p, r, generator=gen) @ (codes @ bank.flatten(1)).view(n, r, d)
    weights += noise * weights.std() * torch.randn(weights.shape, generator=gen)
    ids = torch.stack([torch.arange(n) // 16, torch.arange(n) % 16], 1)
    return weights, ids


def _fit_worker(comm: Comm, out: str, problem: dict, cfg: dict) -> None:
    import time

    from globe.fit.engine import fit_family
    weights, ids = planted(**problem)
    lo, hi = comm.shard(weights.shape[0])
    weights, ids = weights[lo:hi].clone(), ids[lo:hi].clone()
    comm.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    fam = fit_family(weights, ids, FitConfig.from_dict(cfg), "gate", comm=comm)
    cpu = time.process_time() - cpu0                                        # this process's CPU time
    comm.barrier()
    seconds = time.perf_counter() - t0
    cpu_sum, cpu_max = comm.all_reduce_float(cpu), comm.all_reduce_float(cpu, "max")
    if fam is not None:
        save_file({"bank": fam.bank, "codes": fam.codes}, out + ".safetensors")
        Path(out + ".json").write_text(json.dumps({
            "seconds": round(seconds, 3), "cpu_seconds_sum": round(cpu_sum, 3),
            "cpu_seconds_max": round(cpu_max, 3), "rel_err": fam.metrics["rel_err"],
            "median_support": fam.metrics["median_support"], "am_iterations": fam.metrics["am_iterations"],
            "phase_seconds": {k: v["seconds"] for k, v in fam.metrics["timings"].items()},
            "rank0_collectives": dict(getattr(comm, "traffic", {}))}))


def time_processes(problem: dict, cfg: FitConfig, worlds: tuple[int, ...] = (1, 2), threads: int = 1,
                   repeats: int = 1) -> dict:
    """Fit the planted problem with each number of gloo processes; best-of-`repeats` seconds and the agreement
    of each bank with the 1-process bank (relative Frobenius difference)."""
    rows, banks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            runs = []
            for rep in range(repeats):
                out = str(Path(tmp) / f"w{world}_{rep}")
                run_local(_fit_worker, world, out, problem, cfg.to_dict(), threads=threads)
                runs.append(json.loads(Path(out + ".json").read_text()))
                banks[world] = load_file(out + ".safetensors")
            best = min(runs, key=lambda row: row["seconds"])
            rows[world] = {**best, "seconds_all": [row["seconds"] for row in runs]}
            log.info("%d process(es): %.2f s, rel_err %.5f", world, best["seconds"], best["rel_err"])
    ref = banks[worlds[0]]
    for world in worlds:
        rows[world]["bank_rel_diff_vs_1"] = float((banks[world]["bank"] - ref["bank"]).norm() / ref["bank"].norm())
        rows[world]["speedup_vs_1"] = round(rows[worlds[0]]["seconds"] / rows[world]["seconds"], 3)
    return {"processes": {str(w): row for w, row in rows.items()}, "threads_per_process": threads,
            "backend": "gloo", "device": cfg.train.device}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=256, help="N experts (default 256)")
    p.add_argument("--p", type=int, default=256, help="rows of an expert (default 256)")
    p.add_argument("--d", type=int, default=512, help="columns of an expert (default 512)")
    p.add_argument("--m", type=int, default=32, help="atoms (default 32)")
    p.add_argument("--r", type=int, default=32, help="adapter rank (default 32)")
    p.add_argument("--support", type=int, default=4, help="planted and target support (default 4)")
    p.add_argument("--am-iters", type=int, default=4, help="AM iterations (default 4)")
    p.add_argument("--varpro-steps", type=int, default=6, help="L-BFGS evaluations (default 6)")
    p.add_argument("--chunk-size", type=int, default=64, help="experts per chunk (default 64)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="runs per process count; the fastest is kept (default 1)")
    p.add_argument("--device", default="cpu", help="fit device of every process (default cpu)")
    p.add_argument("--out", default="benchmarks/results/distributed.json", help="JSON output path")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = dict(n=args.experts, p=args.p, d=args.d, m=args.m, r=args.r, k=args.support)
    cfg = FitConfig(bank=BankConfig(m=args.m, r=args.r), sparsity=SparsityConfig(target_support=args.support),
                    train=TrainConfig(am_iters=args.am_iters, tol=-1.0, varpro_steps=args.varpro_steps,
                                      chunk_size=args.chunk_size, device=args.device))
    result = {"problem": problem, "config": cfg.to_dict(), "torch": torch.__version__,
              "cpu_threads_available": torch.get_num_threads(),
              **time_processes(problem, cfg, threads=args.threads, repeats=args.repeats)}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(json.dumps(result["processes"], indent=2))


if __name__ == "__main__":
    main()
