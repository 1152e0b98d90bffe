"""Fit runs: everything around fit_model that makes a run safe to start, interrupt and resume.

    result = run_fit(FitRun(model_dir, "out/", FitConfig()))     # writes out/banks.safetensors + globe_config.json

A run sets up the communicator (one process, or the torchrun group), checks OUT before any work, opens the
resume store (OUT/.globe_checkpoint), removes an output directory it created when the input turns out bad,
saves the artifact (rank 0 only), clears the resume files, and sends every metric to OUT/metrics.jsonl (and
wandb when enabled). Both front ends (`globe fit`, the Hydra entry point) call run_fit.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from globe import tracking
from globe.artifact import save
from globe.core.result import FitResult
from globe.device import resolve_device
from globe.errors import ConfigError, GlobeError
from globe.fit.config import FitConfig
from globe.fit.distributed import LOCAL, env_world_size, init_comm
from globe.fit.engine import fit_model
from globe.run.config import WandbConfig
from globe.run.output_dir import check_output_dir
from globe.run.resume_store import RESUME_DIR, ResumeStore

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("rel_err", "energy_captured", "median_support", "seconds")


@dataclass
class FitRun:
    """One fit run: the model, OUT, the fit config and what to do with OUT and the metrics."""

    model_dir: str
    out: str
    config: FitConfig = field(default_factory=FitConfig)
    resume: bool = False
    overwrite: bool = False
    distributed: bool = False                 # also implied when WORLD_SIZE > 1
    metrics: str | None = None                # JSONL metrics file (default OUT/metrics.jsonl)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def start_comm(run: FitRun):
    """LOCAL, or the torchrun process group when distributed or WORLD_SIZE > 1 (other ranks log warnings only)."""
    if not (run.distributed or env_world_size() > 1):
        return LOCAL
    if "RANK" not in os.environ:
        raise ConfigError("--distributed needs the processes started by torchrun, e.g. "
                          "torchrun --nproc_per_node 2 -m globe.cli.main fit ... --distributed")
    comm = init_comm(resolve_device(run.config.train.device), force=True)
    if not comm.is_main:
        logging.getLogger("globe").setLevel(logging.WARNING)
    log.info("distributed fit on %d processes", comm.world)
    return comm


def run_fit(run: FitRun) -> FitResult | None:
    """Fit and save into run.out, with metrics going to run.metrics (default OUT/metrics.jsonl) and wandb;
    returns the result on rank 0, None on the other ranks of a distributed fit."""
    metrics = Path(run.metrics) if run.metrics else Path(run.out) / "metrics.jsonl"
    with tracking.session(jsonl=metrics, wandb_mode=run.wandb.mode, wandb_project=run.wandb.project,
                          config=run.config.to_dict(), append=run.resume, run_name=Path(run.out).name):
        return _fit_and_save(run)


def _fit_and_save(run: FitRun) -> FitResult | None:
    out, cfg = Path(run.out), run.config
    comm = start_comm(run)
    if comm.world > 1 and run.resume:
        raise ConfigError("--resume is not supported with --distributed: rerun the distributed fit from the start")
    created = not out.exists()
    if comm.is_main:
        check_output_dir(out, run.overwrite, run.resume)
    store = ResumeStore(out, cfg, run.model_dir, resume=run.resume) if comm.world == 1 else None
    try:
        result = fit_model(run.model_dir, cfg, store=store, comm=comm)
    except GlobeError:
        if created and comm.is_main and not (out / RESUME_DIR).exists():
            shutil.rmtree(out, ignore_errors=True)          # bad input: leave no empty output behind
        raise
    comm.close()                                          # after an error torchrun stops the other processes
    if result is None:                                     # not rank 0: rank 0 writes and reports
        return None
    save(result, out)
    if store is not None:
        store.clear()
    return result


def fit_summary(result: FitResult) -> dict[str, dict]:
    """Per family: m, r, stored/dense params, rel_err, energy, median support, seconds (act_rel_err if any)."""
    return {name: {k: fam.metrics[k] for k in SUMMARY_KEYS}
            | {"m": fam.shape["m"], "r": fam.shape["r"],
               "params_ratio": fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"]}
            | {k: fam.metrics[k] for k in ("act_rel_err",) if k in fam.metrics}
            for name, fam in result.families.items()}


def format_fit_summary(summary: dict[str, dict], out: str | Path) -> str:
    """The table both front ends print after a fit."""
    lines = [f"{'family':8} {'m':>5} {'r':>5} {'params':>8} {'rel_err':>9} {'energy':>8} {'support':>8} {'time s':>7}"]
    for name, row in summary.items():
        lines.append(f"{name:8} {row['m']:5d} {row['r']:5d} {row['params_ratio']:8.3f} {row['rel_err']:9.4f} "
                     f"{row['energy_captured']:8.4f} {row['median_support']:8.1f} {row['seconds']:7.1f}")
        if "act_rel_err" in row:
            lines.append(f"{'':8} activation-weighted rel_err {row['act_rel_err']:.4f}")
    lines.append(f"artifact written to {out}")
    return "\n".join(lines)
