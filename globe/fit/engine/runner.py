"""The [AM, VarPro] x cycles x restarts stages and the one runner that drives them from a cursor.

Each stage is a function (problem, progress, starts) -> FitProgress that returns the progress with its cursor
moved on (resume.STAGES): the runner looks the stage up by the cursor, runs it, and hands the result to the
store after AM, after VarPro and when a restart ends (plus every train.checkpoint_every AM iterations). A
resumed fit is the same loop started from a stored progress, so it computes exactly what the uninterrupted one
did from that point on.

    warm_start   take restart k's warm start                        -> (k, 0, cycle_start)
    cycle_start  reset the per-cycle best state                     -> (k, c, am)
                 after the last cycle: keep the restart if best     -> (k + 1, 0, warm_start | done)
    am           alternating minimisation (globe.fit.solvers.am.run_am)     -> (k, c, varpro)
    varpro       settle on the best AM state, variable projection   -> (k, c + 1, cycle_start)
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

from globe import tracking
from globe.fit.solvers.am import AMState, run_am
from globe.fit.solvers.adapters import finalize
from globe.fit.solvers.mod import normalize_atoms
from globe.fit.solvers.problem import Factors
from globe.fit.solvers.varpro import varpro_refine
from globe.fit.resume import Attempt, Cursor, FitProgress
from globe.fit.engine.shape import WarmStart

log = logging.getLogger(__name__)


def _moved(progress: FitProgress, **cursor) -> FitProgress:
    return dataclasses.replace(progress, cursor=dataclasses.replace(progress.cursor, **cursor))


def take_warm_start(problem, progress: FitProgress, starts: list[WarmStart | None]) -> FitProgress:
    """A new restart starts from its warm start (the AM state owns it from now on)."""
    k = progress.cursor.restart
    start, starts[k] = starts[k], None
    state = AMState(start.bank, start.codes, start.temperature)
    return dataclasses.replace(progress, cursor=Cursor(k, 0, "cycle_start"), state=state, varpro=[])


def start_cycle(problem, progress: FitProgress, starts) -> FitProgress:
    """Reset the per-cycle best state, or end the restart after its last cycle."""
    if progress.cursor.cycle >= problem.cfg.train.cycles:
        return end_restart(problem, progress)
    s = progress.state
    s.iteration, s.best_err, s.best_bank, s.best_codes = 0, math.inf, None, None
    return _moved(progress, stage="am")


def am_stage(problem, progress: FitProgress, starts) -> FitProgress:
    """Alternating minimisation from the state (continuing a resumed one), checkpointing every k iterations."""
    every = problem.cfg.train.checkpoint_every

    def on_iteration(state: AMState) -> None:
        if every > 0 and state.iteration % every == 0:
            problem.checkpoint(progress)

    run_am(problem.work, progress.state, problem.options.am, problem.family, on_iteration)
    return _moved(progress, stage="varpro")


def settle(problem, state: AMState) -> tuple:
    """(bank, codes, error) of the final AM state, or of the best one seen if the last iterations made the
    error worse."""
    identity = dataclasses.replace(problem.options.finalize, phi="identity")
    _, _, sq_err = finalize(problem.work, state, identity, keep_adapters=False)
    final = problem.shard.rel_err(sq_err, problem.norm)
    if state.best_bank is None or final <= state.best_err:
        return state.bank, state.codes, final
    return state.best_bank, state.best_codes, state.best_err


def varpro_stage(problem, progress: FitProgress, starts) -> FitProgress:
    """Variable projection from the settled AM state; the restart's error is the last VarPro loss."""
    cfg, state = problem.cfg, progress.state
    bank, codes, err = settle(problem, state)
    varpro = list(progress.varpro)
    if cfg.train.varpro_steps > 0:
        label = f"VarPro {problem.family} ({problem.objective.work_error(problem.spaces)})"
        options = dataclasses.replace(problem.options.varpro, label=label)
        bank, codes, losses = varpro_refine(problem.work, Factors(bank, codes, state.temperature), options)
        bank, codes = normalize_atoms(bank, codes)
        varpro += losses
        err = losses[-1] if losses else err
        tracking.emit("varpro", family=problem.family, evaluations=len(losses), rel_err=err)
    state.bank, state.codes = bank, codes
    return dataclasses.replace(progress, cursor=Cursor(progress.cursor.restart, progress.cursor.cycle + 1,
                                                       "cycle_start"), varpro=varpro, err=err)


def end_restart(problem, progress: FitProgress) -> FitProgress:
    """Keep the finished restart if it is the best so far; move to the next one."""
    k, state = progress.cursor.restart, progress.state
    log.debug("%s start %d: rel_err %.5f", problem.family, k, progress.err)
    best = progress.best
    if best is None or progress.err < best.err:
        history = {key: v for key, v in {"am": state.history, "varpro": progress.varpro}.items() if v}
        best = Attempt(progress.err, state.bank, state.codes, state.temperature, history)
    stage = "warm_start" if k + 1 < problem.cfg.train.restarts else "done"
    return FitProgress(cursor=Cursor(k + 1, 0, stage), state=None, varpro=[], err=math.inf, best=best)


STAGES: dict[str, Callable] = {"warm_start": take_warm_start, "cycle_start": start_cycle, "am": am_stage,
                               "varpro": varpro_stage}


def run_restarts(problem, starts: list[WarmStart | None], progress: FitProgress | None = None) -> Attempt:
    """Run the stages from `progress` (a fresh fit: restart 0's warm start) until every restart is done;
    returns the restart with the lowest final error."""
    progress = progress or FitProgress()
    while progress.cursor.stage != "done":
        before = progress.cursor
        if before.stage in ("am", "varpro"):                       # timed phases (globe.fit.engine.phases)
            with problem.phase(before.stage):
                progress = STAGES[before.stage](problem, progress, starts)
        else:
            progress = STAGES[before.stage](problem, progress, starts)
        if before.stage in ("am", "varpro") or progress.cursor.restart != before.restart:
            problem.checkpoint(progress)
    return progress.best
