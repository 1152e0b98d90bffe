"""Fit runs: everything around fit_model that makes a run safe to start, interrupt and resume.

    result = run_fit(FitRun(model_dir, "out/", FitConfig()))     # writes out/banks.safetensors + globe_config.json

A run sets up the communicator (one process, or the torchrun group), checks OUT before any work, opens the
resume store (OUT/.globe_checkpoint), holds OUT's lock (globe.core.outputs: one run per output, crash debris
removed, a finished artifact never replaced by --resume), removes an output directory it created when the run
fails, saves the artifact (rank 0 only), clears the resume files, and sends every metric to OUT/metrics.jsonl (and
wandb when enabled). Both front ends (`globe fit`, the Hydra entry point) call run_fit.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from globe import tracking
from globe.artifact import load, save
from globe.formats.artifact import BANKS_FILE
from globe.core import outputs
from globe.core.result import FitResult
from globe.device import resolve_device
from globe.errors import ConfigError, GlobeError, OutputError
from globe.fit.config import FitConfig
from globe.fit.parallel.comm import LOCAL, env_world_size, init_comm
from globe.fit.engine import fit_model
from globe.run.config import WandbConfig
from globe.run.resume_store import ResumeStore

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
    config_file: str | None = None            # the --config file the config came from (an input: never written)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def apply_total_cut(cfg: FitConfig, model_dir: str | Path, cut: float) -> FitConfig:
    """cfg (changed in place) with the per-family budget that cuts `cut` of ALL the checkpoint's parameters,
    every fitted family shrinking by the same fraction (the target support is lowered when no shape fits)."""
    from globe.fit.solvers.budget import total_cut_budget
    from globe.io import open_checkpoint
    if not 0 < cut < 1:
        raise ConfigError(f"--total-cut must be in (0, 1), not {cut}")
    if cfg.bank.m is not None or cfg.bank.r is not None:
        raise ConfigError("--total-cut sets the budget: drop --m / --r (or give --budget instead of --total-cut)")
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    budget, support = total_cut_budget(cut, inv, tuple(cfg.bank.families), cfg.sparsity.target_support)
    if support != cfg.sparsity.target_support:
        log.info("total cut %.3f: target support lowered to %d so that a bank shape fits", cut, support)
    cfg.bank.budget, cfg.sparsity.target_support = budget, support
    log.info("total cut %.3f of %s params -> budget %.4f per family (%s)", cut, f"{inv.total_params:,}", budget,
             ", ".join(cfg.bank.families))
    return cfg.validate()


def total_cut_of(result: FitResult) -> float | None:
    """The cut of all the source checkpoint's parameters a fit achieves (None without an inventory)."""
    total = (result.source.get("inventory") or {}).get("total_params")
    if not total:
        return None
    return sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families) / total


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
    inputs = [run.model_dir, run.config.activation.stats, run.config_file]
    outputs.check_not_an_input(run.out, inputs)                       # OUT first: the message names -o
    if Path(run.model_dir).is_dir():
        from globe.export.files import check_source_model
        check_source_model(run.model_dir, "MODEL_DIR")                # a compressed checkpoint is no source
    outputs.check_not_an_input(metrics, inputs, "--metrics")
    if run.metrics:                                        # a user's file: replaced only with --overwrite
        outputs.check_log_file(metrics, "--metrics", overwrite=run.overwrite, append=run.resume)
    if metrics.is_dir():
        raise OutputError(f"--metrics {metrics} is a directory: pass a file name (default OUT/metrics.jsonl)")
    resolve_device(run.config.train.device)                # an unavailable device fails before any work
    with tracking.session(jsonl=metrics, wandb_mode=run.wandb.mode, wandb_project=run.wandb.project,
                          config=run.config.to_dict(), append=run.resume, run_name=Path(run.out).name):
        return _fit_and_save(run)


def _fit_and_save(run: FitRun) -> FitResult | None:
    out, cfg = Path(run.out), run.config
    comm = start_comm(run)
    if comm.world > 1 and run.resume:
        raise ConfigError("--resume is not supported with --distributed: rerun the distributed fit from the start")
    claim = outputs.claim_output_dir(out, "fit", run.overwrite, run.resume,
                                     inputs=[run.model_dir, cfg.activation.stats, run.config_file])
    with claim if comm.is_main else contextlib.nullcontext():      # lock, debris, undo a created OUT on failure
        store = ResumeStore(out, cfg, run.model_dir, resume=run.resume) if comm.world == 1 else None
        if run.resume and not run.overwrite and store is not None:
            check_resume_target(out, store)
        result = fit_model(run.model_dir, cfg, store=store, comm=comm)
        comm.close()                                      # after an error torchrun stops the other processes
        if result is None:                                 # not rank 0: rank 0 writes and reports
            return None
        warn_support(result)
        save(result, out)
        if store is not None:
            store.clear()
        return result


def check_resume_target(out: Path, store: ResumeStore) -> None:
    """--resume never replaces a finished artifact: only one whose fit was interrupted after it was written
    (its resume files, made with this config and model, are still there) may be completed."""
    if not (out / BANKS_FILE).exists():
        return
    try:
        load(out)
    except GlobeError:
        return                                             # torn or incomplete: a write was interrupted
    if not store.has_matching():
        raise OutputError(f"output directory {out} holds a finished artifact: --resume only continues an "
                          f"interrupted fit; pass --overwrite to replace the artifact, or choose another -o")


def offered_atoms(m: int, temperature: float, method: str) -> int:
    """How many of m atoms the support selection offers the codes at `temperature`, for scale-free logits spread
    evenly over [-1, 1] (globe.fit.solvers.sparse_coding.support_logits): all of them at the default maximum."""
    import torch
    from globe.fit.solvers.sparse_coding import mapping
    logits = torch.linspace(-1.0, 1.0, m, dtype=torch.float64) / temperature
    return int((mapping(method)(logits, dim=-1) > 0).sum())


def warn_support(result: FitResult) -> list[str]:
    """Report every family whose median support stayed below the target, with what really happened: the
    temperature the codes were last selected at (of its maximum) and the support they had there; returns those
    families.

    A WARNING where the fit fell short: the temperature was still below its maximum (the fit stopped before the
    target, or later steps dropped atoms), or its maximum offers fewer atoms than the target (raise t_max).
    INFO where the target is out of reach on this bank: at the maximum temperature the selection offers the codes
    at least the target's number of atoms, and the non-negative least-squares values are positive on fewer of them.
    That is the default run's case: its budget solver picks m = 13 atoms for the target 12, every atom is offered,
    and the non-negative codes keep a median of 7 of them."""
    sparsity = result.config.sparsity
    target = sparsity.target_support
    short = [n for n, f in result.families.items() if f.metrics.get("median_support", target) < target - 0.5
             and f.bank.shape[1] > 0]                  # a plain family (rank 0, no low-rank part) has no codes
    for name in short:
        fam = result.families[name]
        median, m = fam.metrics["median_support"], int(fam.bank.shape[0])
        last = (fam.history.get("am") or [{}])[-1]
        temperature = last.get("temperature", fam.metrics.get("final_temperature"))
        at_max = temperature is not None and temperature >= sparsity.t_max * (1 - 1e-6)
        offered = offered_atoms(m, temperature, sparsity.method) if at_max else 0
        if at_max and offered >= target:
            log.info("%s: median support %.1f < target %d: out of reach on this bank, not a fault of the fit; at the "
                     "maximum temperature %.3g the selection offers %d of its %d atoms and the non-negative codes are "
                     "positive on fewer (--target-support %d plans for what it reaches)", name, median, target,
                     temperature, offered, m, int(median))
            continue
        if temperature is None:
            why = "no code selection was recorded"
        elif at_max:
            why = (f"at temperature {temperature:.3g} of max {sparsity.t_max:.3g}, which offers the codes only "
                   f"{offered} of the {m} atoms: raise sparsity.t_max to let them spread further")
        else:
            why = (f"at temperature {temperature:.3g} of max {sparsity.t_max:.3g}, where the last code selection had "
                   f"median support {last.get('median_support', float('nan')):.1f}: the fit stopped before reaching "
                   f"the target, or later steps dropped atoms (non-negative codes, pruning)")
        log.warning("%s: median support %.1f < target %d %s; the fit is valid, pass --target-support %d to ask "
                    "for what it reaches", name, median, target, why, int(median))
    return short


def fit_summary(result: FitResult) -> dict[str, dict]:
    """Per family: m, r, stored/dense params, rel_err, energy, median support, seconds (act_rel_err if any)."""
    return {name: {k: fam.metrics[k] for k in SUMMARY_KEYS}
            | {"m": fam.shape["m"], "r": fam.shape["r"],
               "params_ratio": fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"]}
            | {k: fam.metrics[k] for k in ("act_rel_err",) if k in fam.metrics}
            | ({"ranks": list(fam.ranks)} if fam.ranks is not None else {})
            for name, fam in result.families.items()}


def format_fit_summary(summary: dict[str, dict], out: str | Path) -> str:
    """The table both front ends print after a fit."""
    lines = [f"{'family':8} {'m':>5} {'r':>5} {'params':>8} {'rel_err':>9} {'energy':>8} {'support':>8} {'time s':>7}"]
    for name, row in summary.items():
        lines.append(f"{name:8} {row['m']:5d} {row['r']:5d} {row['params_ratio']:8.3f} {row['rel_err']:9.4f} "
                     f"{row['energy_captured']:8.4f} {row['median_support']:8.1f} {row['seconds']:7.1f}")
        if "act_rel_err" in row:
            lines.append(f"{'':8} activation-weighted rel_err {row['act_rel_err']:.4f}")
        if "ranks" in row:
            lines.append(f"{'':8} rank per MoE layer {row['ranks']} (r is their maximum)")
    lines.append(f"artifact written to {out}")
    return "\n".join(lines)
