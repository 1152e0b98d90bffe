"""The fit engine: one family's fit as a list of stages, and fit_model streaming a checkpoint through it.

A family fit, read top to bottom (fit_family):

1. problem     FamilyProblem.build: the config checked against the weights, the objective's spaces (what is
               compared, what AM works on), this rank's ExpertShard, the device and the generator. Built once.
2. normalise   per-expert RMS scales of the work space (globe.fit.solvers.normalize).
3. shape       (m, r) from the config or the budget solver (globe.fit.engine.shape).
4. warm start  every restart's (bank, codes, temperature) from gauge-aligned targets (globe.fit.warm_starts.base);
               skipped on a resume that needs none.
5. alternate   [AM, VarPro] x cycles for each restart, driven by a cursor (restart, cycle, stage) and
               checkpointed between stages (globe.fit.engine.runner, globe.fit.resume); the best restart is kept.
6. objective   the objective's own stage (globe.fit.objectives.base): none in weight space; the activation-aware
               objective folds its global whitening back and runs VarPro under the weighted loss.
               A new refinement (nonlinear phi, output space) plugs in here, as an Objective whose
               `after_alternation` runs it, or as one more stage function of this list.
7. finalise    exact adapters for the final (bank, codes) under the objective (globe.fit.solvers.adapters.finalize).
8. refine      optional Adam on (bank, codes, adapters) with the real phi, rolled back if it made things worse.
8b. ranks      optional (cfg.ranks.allocation, registered in globe.fit.engine.ranks.ALLOCATIONS): the fit ran at
               r_max; the atoms' rows are nested by energy and each layer gets the rank its measured error earns.
9. gather      adapters folded back to the original scale, every rank's experts gathered onto rank 0, metrics.
10. quantize   with cfg.quant.bits: bank quantized, adapters refitted to it and quantized with GPTQ error feedback
               (globe.fit.engine.quantize).
With bank.budget == 0 (globe.fit.engine.plain) stages 3-8 are replaced by no base (rank 0): the family is plain
quantization of its experts, stored as quantized residuals.

Each stage takes the problem and the previous stage's result (a dataclass) and returns a new one; fit_family
returns the FamilyFit (tensors on the CPU, metrics, history) and writes nothing. Distributed fits run the same
stages: only ExpertShard (and the Comm it owns) knows there is more than one process.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from globe import tracking
from globe.core.result import FamilyFit
from globe.device import peak_memory_mb
from globe.fit.config import FitConfig
from globe.fit.engine.duplicates import duplicate_experts, tie_duplicates
from globe.fit.engine.nonlinear import groups_applies, groups_fit, nonlinear_applies, nonlinear_stage
from globe.fit.engine.plain import plain_applies, zero_factors
from globe.fit.engine.problem import FamilyProblem
from globe.fit.engine.ranks import ALLOCATIONS, headroom_rank
from globe.fit.engine.quantize import quantize_applies, quantize_family
from globe.fit.engine.runner import run_restarts
from globe.fit.engine.shape import shape_stage, warm_start_stage
from globe.fit.objectives.base import Objective, Solution
from globe.fit.objectives.weights import WEIGHTS
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.resume import FitProgress
from globe.fit.solvers.adam import adam_refine
from globe.fit.solvers.adapters import finalize
from globe.fit.solvers.metrics import bank_metrics, code_metrics, error_metrics
from globe.fit.solvers.mod import normalize_atoms
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.problem import Factors, FittedFactors, SolverProblem
from globe.fit.solvers.sparse_coding import prune_codes

log = logging.getLogger(__name__)

__all__ = ["Fitted", "fit_family"]


@dataclass
class Fitted:
    """A complete solution in the normalised target space: bank, codes, exact adapters and their errors."""

    bank: torch.Tensor            # [m, r, d]
    adapters: torch.Tensor        # [n_k, p, r] (normalised space)
    codes: torch.Tensor           # [n_k, m]
    sq_err: torch.Tensor          # [n_k] fp64, original space
    norm: Normalizer
    temperature: float
    history: dict
    phi: str                      # the phi of the mixing these adapters were fitted for
    ranks: tuple[int, ...] | None = None   # rank per MoE layer (rank stage); None: r everywhere


def fit_family(weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str = "gate",
               generator: torch.Generator | None = None, resume: FitProgress | None = None,
               on_progress: Callable[[FitProgress], None] | None = None, comm: Comm = LOCAL,
               objective: Objective | None = None) -> FamilyFit | None:
    """Fit one family: weights [N, p, d] (any float dtype, kept as stored), ids [N, 2] (layer, expert).

    resume: progress reported by an interrupted fit of the same data and config (see globe.fit.resume);
    on_progress(progress) is called at every checkpoint (single process only).
    Distributed (comm a DistComm): weights/ids are this rank's contiguous slice comm.shard(N); rank 0 returns
    the FamilyFit of all experts, the other ranks None.
    objective: what is minimised (globe.fit.objectives.base; default: weight space; an activation-aware fit passes a
    globe.fit.objectives.activation.ActivationObjective)."""
    problem = FamilyProblem.build(weights, ids, cfg, family, generator, comm, objective or WEIGHTS, on_progress,
                                  resumable=resume is not None)
    with problem.phase("normalize"):
        problem.norm = Normalizer.fit(problem.spaces.work, cfg.train.chunk_size, problem.names)
    if groups_applies(cfg, comm.world, problem.objective):
        with problem.phase("nonlinear"):
            fitted = groups_stage(problem)
        return gather_stage(problem, fitted)
    if plain_applies(cfg):                            # no low-rank part: the quantize stage stores W as residuals
        return _quantized(problem, gather_stage(problem, plain_stage(problem)))
    with problem.phase("shape"):
        shape = shape_stage(problem)
    allocate, budget_rank = ALLOCATIONS[cfg.ranks.allocation], shape.r
    if allocate is not None:                          # fit at r_max, cut per layer in the rank stage
        shape = dataclasses.replace(shape, r=headroom_rank(shape.r, *problem.spaces.target.shape[1:],
                                                           cfg.ranks.headroom))
    log.info("fitting %s: N=%d p=%d d=%d with m=%d r=%d (%s init)%s", family, problem.shard.n,
             *problem.spaces.target.shape[1:], shape.m, shape.r, cfg.bank.init,
             f" on {comm.world} processes" if problem.shard.distributed else "")
    progress = _resumed(problem, resume)
    starts = []
    if progress is None or progress.cursor.stage == "warm_start" or progress.cursor.restart + 1 < cfg.train.restarts:
        with problem.phase("warm_start"):
            starts = warm_start_stage(problem, shape)
    del shape
    if progress is not None and progress.gen_state is not None:
        problem.gen.set_state(progress.gen_state)                          # the draws of the uninterrupted fit
    best = run_restarts(problem, starts, progress)                         # phases am and varpro
    del starts
    problem.spaces = dataclasses.replace(problem.spaces, work=problem.spaces.target)   # the AM copy is done
    solution = Solution(best.bank, best.codes, problem.norm, best.temperature, dict(best.history))
    with problem.phase(problem.objective.stage_name) if problem.objective.stage_name else nullcontext():
        solution = problem.objective.after_alternation(problem, solution)
    with problem.phase("finalize"):
        fitted = finalise_stage(problem, solution)
    if nonlinear_applies(cfg, comm.world, problem.objective):
        with problem.phase("nonlinear"):
            fitted = nonlinear_refine_stage(problem, fitted)
    if cfg.train.refine_steps > 0:
        with problem.phase("refine"):
            fitted = refine_stage(problem, fitted)
    if allocate is not None:
        with problem.phase("ranks"):
            fitted = allocate(problem, fitted, budget_rank)
    return _quantized(problem, gather_stage(problem, fitted))


def _quantized(problem: FamilyProblem, fam: FamilyFit | None) -> FamilyFit | None:
    """The quantize stage, where cfg.quant.bits asks for it (rank 0 only)."""
    if fam is not None and quantize_applies(problem.cfg):
        with problem.phase("quantize"):
            fam = quantize_family(problem.spaces.original, fam, problem.cfg, problem.objective,
                                  problem.shard.comm.world)
        fam.metrics["timings"] = problem.timings
    return fam


def _resumed(problem: FamilyProblem, resume: FitProgress | None) -> FitProgress | None:
    if resume is None:
        return None
    c = resume.cursor
    log.info("%s: resuming at restart %d, cycle %d, stage %s", problem.family, c.restart, c.cycle, c.stage)
    return resume.to(problem.device)


def finalise_stage(problem: FamilyProblem, solution: Solution) -> Fitted:
    """Exact adapters under the objective for the solution's (bank, codes)."""
    adapted = finalize(SolverProblem(problem.spaces.target, solution.norm, problem.objective),
                       Factors(solution.bank, solution.codes), problem.options.finalize)
    return Fitted(solution.bank, adapted.adapters, adapted.codes, adapted.sq_err, solution.norm,
                  solution.temperature, solution.history, problem.cfg.bank.phi)


def plain_stage(problem: FamilyProblem) -> Fitted:
    """bank.budget == 0 (globe.fit.engine.plain): no base (rank 0), in place of shape, warm start and [AM, VarPro]."""
    n, p, d = problem.spaces.target.shape
    bank, adapters, codes = zero_factors(n, p, d)
    return Fitted(bank, adapters, codes, problem.norm.sq_norms.double().clone(), problem.norm, 0.0, {}, "identity")


def groups_stage(problem: FamilyProblem) -> Fitted:
    """nonlinear.start == "groups": block SVD start + full-batch nonlinear refinement (globe.fit.engine.nonlinear),
    in place of shape, warm start and [AM, VarPro]."""
    f, steps, phi = groups_fit(problem.spaces.target, problem.ids, problem.norm, problem.cfg, problem.family,
                               problem.device)
    return Fitted(f.bank, f.adapters, f.codes, f.sq_err, problem.norm, 0.0, {"nonlinear": steps}, phi)


def nonlinear_refine_stage(problem: FamilyProblem, fitted: Fitted) -> Fitted:
    """nonlinear.start == "am": the finalised linear solution refined with phi = nonlinear.phi (kept if worse)."""
    f, steps, phi = nonlinear_stage(
        SolverProblem(problem.spaces.target, fitted.norm),
        FittedFactors(fitted.bank, fitted.codes, fitted.adapters, fitted.sq_err), problem.options.nonlinear,
        problem.cfg.bank.phi, problem.family)
    return dataclasses.replace(fitted, bank=f.bank, adapters=f.adapters, codes=f.codes, sq_err=f.sq_err, phi=phi,
                               history={**fitted.history, "nonlinear": steps})


def refine_stage(problem: FamilyProblem, fitted: Fitted) -> Fitted:
    """Adam refinement of the fitted solution; rolled back with a warning if it raised the error."""
    cfg, target, norm = problem.cfg, problem.spaces.target, fitted.norm
    bank, codes, _, losses = adam_refine(SolverProblem(target, norm, problem.objective, problem.comm),
                                         Factors(fitted.bank, fitted.codes, fitted.temperature, fitted.adapters),
                                         problem.options.adam, problem.gen)
    bank, codes = normalize_atoms(bank, prune_codes(codes, cfg.sparsity.eps))
    history = {**fitted.history, "refine": losses}
    refined = finalise_stage(problem, Solution(bank, codes, norm, fitted.temperature, history))
    tracking.emit("refine", family=problem.family, steps=len(losses), loss=(losses or [None])[-1])
    before, after = problem.shard.rel_err(fitted.sq_err, norm), problem.shard.rel_err(refined.sq_err, norm)
    if after <= before:
        return refined
    log.warning("%s: Adam refinement raised the error (%.5f -> %.5f): rolled back", problem.family, before, after)
    return dataclasses.replace(fitted, history=history)


def gather_stage(problem: FamilyProblem, fitted: Fitted) -> FamilyFit | None:
    """Adapters back to the original weights, every rank's experts onto rank 0, the FamilyFit with its metrics."""
    adapters = problem.objective.unscale(fitted.norm.fold(fitted.adapters, inplace=True))   # fitted is done
    gathered = problem.shard.gather(fitted.norm, adapters, fitted.codes, fitted.sq_err, problem.ids)
    if gathered is None:
        return None
    norm, adapters, codes, sq_err, ids = gathered
    if not problem.shard.distributed:                 # copies of one expert: the factors of its first occurrence
        sq = norm.sq_norms.double()                      # ||W_i||^2 in the original space: candidates, no 2nd read
        prints = torch.stack([sq, torch.zeros_like(sq)], 1)                        # [N, 2]
        copies = duplicate_experts(problem.spaces.original, problem.names, problem.cfg.train.chunk_size, prints)
        tie_duplicates(copies, adapters, codes, sq_err)
    else:
        copies = {}
    fam = FamilyFit(family=problem.family, bank=fitted.bank.cpu(), codes=codes.cpu(), adapters=adapters.cpu(),
                    scales=norm.scales, ids=ids, phi=fitted.phi, history=fitted.history,
                    ranks=fitted.ranks)                                                      # on the CPU
    fam.metrics = family_metrics(fam, sq_err, norm, problem.timings)
    if copies:
        fam.metrics["duplicates"] = [[c, f] for c, f in copies.items()]   # [copy, first]: the quantize stage ties them
    fam.metrics.update(problem.objective.metrics(problem, fam, sq_err))
    tracking.emit("family_done", family=fam.family,
                  **{k: v for k, v in fam.metrics.items() if k != "rel_err_per_expert"})
    objective = (f" (not the objective: activation-weighted rel_err {fam.metrics['act_rel_err']:.4f})"
                 if "act_rel_err" in fam.metrics else "")
    log.info("%s: weight rel_err %.4f%s, median support %.1f, %d stored params (%.1f%% of dense)", fam.family,
             fam.metrics["rel_err"], objective, fam.metrics["median_support"], fam.metrics["params"]["stored"],
             100 * fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"])
    return fam


def family_metrics(fam: FamilyFit, sq_err: torch.Tensor, norm: Normalizer, timings: dict) -> dict:
    out = {**error_metrics(sq_err, norm.sq_norms, fam.ids), **code_metrics(fam.codes), **bank_metrics(fam.bank)}
    out.update(params=fam.param_count(), shape=fam.shape, weight_mean_abs_max=float(norm.means.abs().max()),
               am_iterations=len(fam.history.get("am", [])), timings=timings,
               seconds=round(sum(t["seconds"] for t in timings.values()), 3), peak_mem_mb=peak_memory_mb())
    if fam.history.get("am"):
        out["am_final_rel_err"] = fam.history["am"][-1]["rel_err"]
        out["final_temperature"] = fam.history["am"][-1]["temperature"]
    if fam.history.get("varpro"):
        out["varpro_evaluations"] = len(fam.history["varpro"])
    return out
