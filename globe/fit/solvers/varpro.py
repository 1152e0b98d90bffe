"""Variable projection of (bank, codes) after alternating minimisation, under any globe.fit.objectives.base.Objective.

varpro_refine: variable projection. The adapters are eliminated exactly (A_i = argmin, batched Cholesky) and
L-BFGS optimises the bank and the code logits on the reduced objective sum_i ||(W_i - A_i*(M) phi(M_i)) R_i||^2,
streamed over expert chunks. This converges where plain alternation stalls.
(globe.fit.solvers.adam is the minibatch Adam refinement with the real phi.)

It takes the objective as one object (its `targets`, `right`, `select`, `total` hooks) and a Comm for the sums
over ranks (a no-op in one process); neither branches on the objective or on the number of processes.
A new refinement (e.g. a nonlinear-phi objective) is a new Objective whose `after_alternation` calls these, or a
function of the same shape: (problem, state, options) -> (bank, codes, losses).
"""
from __future__ import annotations

import logging
import math

import torch

from globe.errors import NumericalError
from globe.core.mixing import compose
from globe.fit.costs import F4, compose_seconds, declare_cost, read_seconds, refit_seconds, refit_work
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.constants import (LBFGS_HISTORY_BYTES, LBFGS_MAX_HISTORY, LBFGS_TOLERANCE_CHANGE,
                                 LBFGS_TOLERANCE_GRAD)
from globe.fit.solvers.linalg import low_precision
from globe.fit.solvers.normalize import Normalizer
from globe.fit.objectives.base import Objective
from globe.fit.objectives.weights import WEIGHTS
from globe.fit.solvers.codes import CodeParams
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions
from globe.fit.solvers.sparse_coding import prune_codes
from globe.progress import counter

log = logging.getLogger(__name__)

__all__ = ["VarProOptions", "lbfgs_history", "uses_lean_varpro", "varpro_refine"]



class _Targets:
    """The objective's normalised target chunks W_i R_i / s_i, cached in fp32 when the objective asks for it."""

    def __init__(self, weights: torch.Tensor, norm: Normalizer, device, objective: Objective) -> None:
        self.weights, self.norm, self.device, self.objective = weights, norm, device, objective
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if not self.objective.cache_targets:
            return self.objective.targets(self.weights, self.norm, lo, hi, self.device)
        if (lo, hi) not in self.cache:
            self.cache[lo, hi] = self.objective.targets(self.weights, self.norm, lo, hi, self.device)
        return self.cache[lo, hi]


def lbfgs_history(numel: int, most: int = LBFGS_MAX_HISTORY) -> int:
    """L-BFGS history length: `most`, fewer when the history would exceed LBFGS_HISTORY_BYTES (large banks)."""
    return int(max(3, min(most, LBFGS_HISTORY_BYTES // (8 * numel))))


def uses_lean_varpro(bank_numel: int, logits_numel: int, objective: Objective = WEIGHTS) -> bool:
    """Whether varpro_refine runs globe.fit.solvers.lean_varpro: in weight space, for banks whose full L-BFGS history
    does not fit LBFGS_HISTORY_BYTES."""
    return objective.plain_weights and lbfgs_history(bank_numel + logits_numel) < LBFGS_MAX_HISTORY


def _reduced_loss(targets: _Targets, bounds, bank, params: CodeParams, offset: int, total: float,
                  options: VarProOptions, low, problem: SolverProblem) -> float:
    """sum_i ||(W_i - A_i* M_i) R_i||^2 / total over this rank's chunks, gradients accumulated (A* held fixed:
    the envelope theorem makes its gradient zero), loss and gradients summed over ranks."""
    loss, phi, objective, comm = 0.0, options.phi, problem.objective, problem.comm
    for lo, hi in bounds:
        w = targets(lo, hi)                                                    # [c, p, d] (weighted)
        mixed = objective.right(compose(params(offset + lo, offset + hi), bank, phi), lo, hi)   # [c, r, d]
        with torch.no_grad():
            adapters = refit_adapters(w, mixed, options.ridge, low).adapters
        part = (w - adapters @ mixed).square().sum() / total
        part.backward()
        loss += float(part.detach())
    loss = comm.all_reduce_float(loss)
    comm.all_reduce_grads([bank, *params.parameters()])
    return loss


def varpro_refine(problem: SolverProblem, state: Factors,
                  options: VarProOptions) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """L-BFGS on (bank, logits) from state (bank, codes, temperature) with adapters projected out under
    problem.objective; returns (bank, codes, loss history).

    options.label names the run in its progress bar (one step per loss evaluation) and in its closing log line, e.g.
    "VarPro gate (activation-weighted error)": a fit can run it on more than one objective.

    Distributed: weights/norm/codes are this rank's experts. Every rank runs the same L-BFGS on the bank and on
    the logits of all experts (gathered: [N, m] is small); each rank evaluates its experts' loss terms, and the
    loss and gradients are summed over ranks, so the optimiser state stays identical everywhere. An objective
    with cache_targets keeps its weighted targets in fp32 for the run (N p d floats; single process only).
    Large banks in weight space (uses_lean_varpro) go to globe.fit.solvers.lean_varpro, which keeps a few flat
    vectors."""
    weights, norm, objective, comm = problem.weights, problem.norm, problem.objective, problem.comm
    bank, codes, label, n = state.bank, state.codes, options.label, weights.shape[0]
    start = (bank, codes)
    n_all = comm.total(n)
    if uses_lean_varpro(bank.numel(), n_all * bank.shape[0], objective):
        from globe.fit.solvers.lean_varpro import lean_varpro
        return lean_varpro(problem, state, options)
    offset = comm.shard(n_all)[0]
    low = low_precision(options.precision, weights.dtype, weights.shape[1], weights.shape[2], bank.device)
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    params = CodeParams(comm.all_gather_rows(codes, n_all), state.temperature, options.method,
                        learn_gain=options.phi != "identity")
    targets = _Targets(weights, norm, bank.device, objective)
    chunk = options.chunk_size
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    total = objective.total(targets, bounds, n_all, weights.shape[1], weights.shape[2])
    opt = torch.optim.LBFGS([bank, *params.parameters()], lr=1.0, max_iter=options.steps,
                            history_size=lbfgs_history(bank.numel() + params.logits.numel()),
                            tolerance_grad=LBFGS_TOLERANCE_GRAD, tolerance_change=LBFGS_TOLERANCE_CHANGE,
                            line_search_fn="strong_wolfe")
    history: list[float] = []
    bar = counter(label, total=opt.param_groups[0]["max_eval"])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _reduced_loss(targets, bounds, bank, params, offset, total, options, low, problem)
        if not math.isfinite(loss):
            raise NumericalError("NaN/Inf in variable-projection refinement (try a larger train.ridge)")
        history.append(loss ** 0.5)
        bar.update(1)
        bar.set_postfix(err=f"{history[-1]:.4f}")
        return torch.tensor(loss, device=bank.device)

    try:
        opt.step(closure)
    except NumericalError as exc:
        log.warning("%s: rolled back to the state before variable projection", exc)
        return start[0], start[1], history[:1]                    # the first evaluation is at the start point
    finally:
        bar.close()
    with torch.no_grad():
        out_codes = prune_codes(params(offset, offset + n), options.eps)
    log.info("%s: %d evaluations, rel_err %.5f -> %.5f", label, len(history), history[0], history[-1])
    return bank.detach(), out_codes.detach(), history


def varpro_memory(s) -> int:
    """Variable projection. torch.optim.LBFGS (small banks): parameters and gradients, 2 h fp32 history vectors,
    flat gradient, its previous copy, direction, line-search copies, plus one chunk of the closure with autograd
    (w, residual, its square, their gradients). Large banks (globe.fit.solvers.lean_varpro): x, g, d, bf16 pairs and the
    old gradient, plus a chunk without any [c, p, d] residual. Both: the AM state's bank and best bank."""
    from globe.fit.solvers.lean_varpro import PAIRS
    if s.varpro_steps == 0:
        return 0
    vec, bank = s.lbfgs_vector(), s.bank
    held = bank * (2 if s.am_iters else 1)
    cpd, crd, cpr = s.c * s.p * s.d, s.c * s.r * s.d, s.c * s.p * s.r
    if s.lean and uses_lean_varpro(s.m * s.r * s.d, s.n * s.m):
        pairs = min(PAIRS, max(s.varpro_steps - 1, 0))
        state = 3 * vec + pairs * vec + vec // 2
        chunk = F4 * cpd + F4 * crd + max(refit_work(s), 3 * F4 * crd + F4 * cpr)   # w, M; A^T W, A^T A M
        return held + state + max(chunk, 3 * vec // 2)
    pairs = min(s.lbfgs_history(), max(s.varpro_steps - 1, 0))              # history fills one pair per iteration
    state = (2 * pairs + 5) * vec + 2 * bank
    closure = 2 * F4 * cpd + 2 * F4 * crd + F4 * cpr + max(refit_work(s), 2 * F4 * cpd + bank)   # w, residual
    return held - bank + bank + state + closure


def varpro_evaluations(s) -> int:
    """Evaluations of the variable projection predicted for train.varpro_steps L-BFGS iterations (about one
    line-search evaluation per iteration plus the first; L-BFGS allows up to 1.25 per iteration)."""
    return s.varpro_steps + 1 if s.varpro_steps else 0


def varpro_evaluation_seconds(s, q) -> float:
    n, p, d, r = s.n, s.p, s.d, s.r
    autograd = n * (2 * 2 * p * d * r / q.wd32 + 4 * s.m * r * d / q.bank + 8 * p * d * 4 / q.stream)
    lbfgs = (4 * min(s.lbfgs_history(), max(s.varpro_steps - 1, 0)) + 20) * s.lbfgs_vector() / q.stream
    return read_seconds(s, q) + compose_seconds(s, q) + refit_seconds(s, q) + autograd + lbfgs


def varpro_seconds(s, q) -> float:
    """varpro_evaluations(s) evaluations in every cycle and restart."""
    return s.cycles * s.restarts * varpro_evaluations(s) * varpro_evaluation_seconds(s, q)


declare_cost("varpro", varpro_memory, varpro_seconds)
