"""Quality benchmark: GloBE vs per-expert SVD vs MoBE (benchmarks/baselines/mobe.py, the peer's own recipe at its
default m = E/4) at equal parameter budgets, plus AM-iteration throughput against a measured matmul peak.
The GloBE and SVD rows are globe.eval.sweep's (what the installed `globe sweep` writes); this script adds the MoBE
row under "mobe" (the key globe/eval/plots.py reads) and the throughput. Writes JSON (default
benchmarks/results/quality.json), usable as `globe eval --plots DIR --sweep` of an artifact of the same model.
The full peer comparison (D2-MoE, whitened SVD, output error, perplexity) is benchmarks/peers.py.

    python benchmarks/quality.py                       # embedded model, budgets 0.5 0.35 0.25, all warm starts
    python benchmarks/quality.py --budgets 0.35 --inits hybrid --families gate
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # benchmarks.baselines from a checkout

from globe.assets import DEFAULT_MODEL_DIR
from globe.core.files import atomic_write_text
from globe.eval.sweep import SweepSettings, run_sweep
from globe.fit.solvers.am import AMOptions, AMState, am_pass
from benchmarks.baselines import rel_err
from benchmarks.baselines.common import by_layer
from benchmarks.baselines.mobe import MobeConfig, fit_mobe
from globe.fit.config import INITS, BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.problem import SolverProblem
from globe.io import open_checkpoint

log = logging.getLogger("benchmarks.quality")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory (default: embedded model)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35, 0.25], help="params / dense per family")
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS, help="GloBE warm starts to compare")
    p.add_argument("--families", nargs="+", default=["gate", "up"], help="families to fit")
    p.add_argument("--target-support", type=int, default=12, help="GloBE target median support")
    p.add_argument("--am-iters", type=int, default=30, help="GloBE AM iterations")
    p.add_argument("--varpro-steps", type=int, default=150, help="GloBE variable-projection L-BFGS evaluations")
    p.add_argument("--mobe-epochs", type=int, default=1000, help="Adam epochs of the MoBE baseline")
    p.add_argument("--out", default="benchmarks/results/quality.json", help="JSON output path")
    p.add_argument("--throughput-only", action="store_true", help="only measure AM throughput (updates --out)")
    return p.parse_args()


def mobe_row(weights, ids, budget: float, epochs: int) -> dict:
    """The MoBE peer at `budget` on one family's experts weights [N, p, d] (ids [N, 2])."""
    stacked = by_layer(weights, ids)                                           # [L, E, p, d]
    t0 = time.perf_counter()
    fit = fit_mobe(stacked, budget, MobeConfig(epochs=epochs))
    return {"method": "MoBE", "m": fit.info["m"], "r": fit.info["r"], "params": fit.params,
            "rel_err": rel_err(stacked, fit.weights), "epochs": epochs, "seconds": round(time.perf_counter() - t0, 2)}


def with_mobe(epochs: int):
    """globe.eval.sweep's `extra`: the MoBE row of each budget."""
    def extra(weights, ids, budget: float) -> dict:
        mobe = mobe_row(weights, ids, budget, epochs)
        log.info("budget %.2f: MoBE %.4f", budget, mobe["rel_err"])
        return {"mobe": mobe}
    return extra


def add_ratios(families: dict) -> None:
    """ratio_vs_mobe (best GloBE / MoBE rel_err) in every row that has both."""
    for rows in families.values():
        for row in rows:
            best = min(g["rel_err"] for g in row["globe"])
            row["ratio_vs_mobe"] = best / row["mobe"]["rel_err"] if row.get("mobe") else None


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def am_flops(n: int, p: int, d: int, m: int, r: int, k: int, cg_iters: int) -> float:
    """Floating-point operations of one AM pass (matmuls and factorisations that dominate)."""
    per_expert = (2 * m * r * d + 2 * r * r * d + 2 * p * r * d + r**3 / 3 + 2 * p * r * r   # compose, refit
                  + 2 * p * r * r + 2 * p * r * d + r**3 / 3 + 2 * r * r * d                # A^T A, A^T W, pinv
                  + 4 * m * r * d + 2 * k * r * r * d + 2 * k * k * r * d + 2 * m * r * d)  # coding, MOD rhs
    cg = cg_iters * (n * (4 * m * r * d + 2 * r * r * d) + 2 * m * m * r * d)     # operator + preconditioner
    return n * per_expert + cg


def throughput(n: int, p: int, d: int, m: int, r: int, k: int, iters: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n, p, d, generator=gen)
    cfg = FitConfig(bank=BankConfig(m=m, r=r), sparsity=SparsityConfig(target_support=k), train=TrainConfig())
    norm = Normalizer.fit(weights)
    bank = torch.randn(m, r, d, generator=gen)
    codes = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < k / m)
    state = AMState(bank=bank / bank.flatten(1).norm(dim=1)[:, None, None], codes=codes + 1e-3, temperature=0.5)
    am_pass(SolverProblem(weights, norm), state, AMOptions.from_config(cfg))              # warm-up
    t0, flops = time.perf_counter(), 0.0
    for _ in range(iters):
        stats = am_pass(SolverProblem(weights, norm), state, AMOptions.from_config(cfg))
        flops += am_flops(n, p, d, m, r, k, stats["mod_cg_iters"])
    secs = (time.perf_counter() - t0) / iters
    return {"shape": {"N": n, "p": p, "d": d, "m": m, "r": r, "k": k}, "seconds_per_iter": round(secs, 4),
            "gflops": round(flops / iters / secs / 1e9, 2)}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = {"families": {}}
    if args.throughput_only and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())
    if not args.throughput_only:
        settings = SweepSettings(budgets=tuple(args.budgets), families=tuple(args.families), inits=tuple(args.inits),
                                 target_support=args.target_support, am_iters=args.am_iters,
                                 varpro_steps=args.varpro_steps)
        results = run_sweep(args.model, settings, extra=with_mobe(args.mobe_epochs))
        add_ratios(results["families"])
    results["torch_threads"] = torch.get_num_threads()
    with open_checkpoint(args.model) as reader:
        p, d = reader.p, reader.d
    peak = matmul_peak()
    small = throughput(96, p, d, 16, p * 3 // 4, args.target_support)          # the model's fit shape (r = 3p/4)
    large = throughput(32, 1408, 2048, 16, 704, args.target_support, iters=1)  # Qwen1.5 expert shape, N/m = 2
    results["throughput"] = {"matmul_peak_gflops": round(peak, 2), "embedded_shape": small, "qwen15_shape": large,
                             "fraction_of_peak": {"embedded_shape": round(small["gflops"] / peak, 3),
                                                  "qwen15_shape": round(large["gflops"] / peak, 3)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(results, indent=1))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
