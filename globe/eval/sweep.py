"""Budget sweep of one checkpoint: GloBE and per-expert truncated SVD at several parameter budgets, the JSON that
`globe eval --plots DIR --sweep JSON` draws as error vs budget. `globe sweep MODEL_DIR -o sweep.json` writes it.

    doc = run_sweep("model/", SweepSettings(budgets=(0.5, 0.35, 0.25)))     # the document, nothing written
    make_sweep("model/", "sweep.json", SweepSettings())                     # the same, written as JSON

The document (its version, reader and writer: globe.formats.sweep): {"format_version", "model": {"model_dir",
"name", "content_hash"}, "settings", "families"}, with per family one row per budget: {"budget", "dense_params",
"svd": {"rank", "params", "rel_err"}, "globe": [one row per warm start: "init", "m", "r", "params", "rel_err",
"median_support", "seconds"], "best_globe", "ratio_vs_svd"}.
benchmarks/quality.py adds "mobe" (the MoBE peer, which lives outside the package) through `extra`. "model" names
the checkpoint by the content hash of globe.io.identity, the one an artifact records in its source, so that the
plots draw a sweep only under an artifact fitted on the same weights.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from globe.core import outputs
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.formats.sweep import new_document, write_sweep
from globe.io import open_checkpoint
from globe.progress import progress

log = logging.getLogger(__name__)
SVD_CHUNK = 64                                   # experts per batched SVD


@dataclass
class SweepSettings:
    """What a sweep fits: the budgets (stored / dense params per family), families, and GloBE's settings."""

    budgets: tuple[float, ...] = (0.5, 0.35, 0.25)
    families: tuple[str, ...] = ("gate", "up")
    inits: tuple[str, ...] = (BankConfig.init,)  # GloBE warm starts (the best one is plotted)
    target_support: int = SparsityConfig.target_support
    am_iters: int = TrainConfig.am_iters
    varpro_steps: int = TrainConfig.varpro_steps
    seed: int = TrainConfig.seed

    def fit_config(self, budget: float, init: str) -> FitConfig:
        return FitConfig(bank=BankConfig(budget=budget, init=init),
                         sparsity=SparsityConfig(target_support=self.target_support),
                         train=TrainConfig(am_iters=self.am_iters, varpro_steps=self.varpro_steps,
                                           seed=self.seed)).validate()


def svd_rank(p: int, d: int, budget: float) -> int:
    """Largest k with k (p + d) <= budget p d (at least 1, at most min(p, d))."""
    return max(1, min(min(p, d), math.floor(budget * p * d / (p + d))))


def svd_row(weights: torch.Tensor, budget: float) -> dict:
    """Per-expert truncated SVD of weights [N, p, d] at `budget`: rank k, stored params N k (p + d), and the
    relative Frobenius error over all experts (from the singular values: ||W - W_k||^2 = sum_{i>k} s_i^2)."""
    n, p, d = weights.shape
    k = svd_rank(p, d, budget)
    tail = total = 0.0
    for start in range(0, n, SVD_CHUNK):
        s = torch.linalg.svdvals(weights[start:start + SVD_CHUNK].double()).square()   # [c, min(p, d)]
        tail += float(s[:, k:].sum())
        total += float(s.sum())
    return {"rank": k, "params": n * k * (p + d), "rel_err": math.sqrt(tail / total) if total else 0.0}


def globe_row(weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str) -> dict:
    """One GloBE fit of weights [N, p, d] under cfg: its shape, stored params, error and support."""
    t0 = time.perf_counter()
    fam = fit_family(weights, ids, cfg, family, torch.Generator().manual_seed(cfg.train.seed))
    met = fam.metrics
    return {"init": cfg.bank.init, "m": fam.shape["m"], "r": fam.shape["r"], "params": met["params"]["stored"],
            "rel_err": met["rel_err"], "am_rel_err": met.get("am_final_rel_err"),
            "median_support": met["median_support"], "seconds": round(time.perf_counter() - t0, 2)}


Extra = Callable[[torch.Tensor, torch.Tensor, float], dict]


def sweep_family(weights: torch.Tensor, ids: torch.Tensor, family: str, settings: SweepSettings,
                 extra: Extra | None = None) -> list[dict]:
    """One row per budget for one family's experts weights [N, p, d] with ids [N, 2] (see the module docstring);
    extra(weights, ids, budget) -> {key: row} adds other methods to each row."""
    rows = []
    for budget in progress(settings.budgets, desc=f"sweep {family}"):
        svd = svd_row(weights, budget)
        fits = [globe_row(weights, ids, settings.fit_config(budget, init), family) for init in settings.inits]
        best = min(fits, key=lambda row: row["rel_err"])
        row = {"budget": budget, "dense_params": weights[0].numel() * weights.shape[0], "svd": svd, "globe": fits,
               "best_globe": best["init"], "ratio_vs_svd": best["rel_err"] / svd["rel_err"] if svd["rel_err"] else None}
        row.update(extra(weights, ids, budget) if extra else {})
        log.info("%s budget %.3g: svd %.4f, GloBE %.4f (%s)", family, budget, svd["rel_err"], best["rel_err"],
                 best["init"])
        rows.append(row)
    return rows


def run_sweep(model_dir: str | Path, settings: SweepSettings | None = None, extra: Extra | None = None) -> dict:
    """The sweep document of the checkpoint model_dir (see the module docstring)."""
    settings = settings or SweepSettings()
    for budget in settings.budgets:
        settings.fit_config(budget, settings.inits[0])              # bad budgets / inits fail before any work
    with open_checkpoint(model_dir) as reader:
        doc = new_document(model_dir, reader.content_hash(), dataclasses.asdict(settings))
        for family in settings.families:
            stack = reader.read_family(family)
            doc["families"][family] = sweep_family(stack.weights, stack.ids, family, settings, extra)
    return doc


def make_sweep(model_dir: str | Path, out: str | Path, settings: SweepSettings | None = None,
               overwrite: bool = False, extra: Extra | None = None) -> dict:
    """run_sweep written to `out` as JSON (atomically; an existing file only with overwrite, refused before any
    fit); the document."""
    with outputs.claim_output_file(out, "sweep", overwrite, inputs=[model_dir]) as path:
        doc = run_sweep(model_dir, settings, extra)
        write_sweep(path, doc)
    log.info("wrote %s", out)
    return doc
