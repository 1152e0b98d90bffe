"""The rank stage of a family fit: a rank per layer where the model feels it (cfg.ranks; registered by name in
ALLOCATIONS, run by fit_family after the fit at r_max and before the gather).

    uniform      nothing to do: every layer keeps the fit's r (the default)
    sensitivity  1. nest the atoms' rows by importance: with phi = identity, W_hat_i = A_i M_i is unchanged by a
                    global rotation R of the r-space (B_j -> R B_j, A_i -> A_i R^T); R is the eigenbasis of
                    G = sum_i sym(A_i^T A_i M_i M_i^T) in the objective's space, leading rows first, so that the
                    first k rows of every atom carry the most energy;
                 2. measure: for every layer and each candidate rank k (a grid up to r_max), the objective's error
                    (activation-weighted for an activation-aware fit) after refitting the adapters exactly against
                    the truncated mixed atoms M_i[:k] (globe.fit.solvers.adapters.finalize, closed form);
                 3. allocate greedily: start every layer at the smallest rank, then repeatedly raise the layer with
                    the largest error drop per added parameter (its adapters, and the bank rows it adds past the
                    largest rank in use) while bank + adapters stay within those of the uniform fit at the budget's
                    rank (the grid holds that rank, so the uniform choice is one of the candidates); with an
                    activation-aware fit whose statistics carry the sensitivity probe the errors are already
                    weighted by each layer's KL per unit error (globe.fit.objectives.sensitivity);
                 4. cut the bank at the largest rank chosen, refit the adapters at the chosen ranks (zero past r_l;
                    FamilyFit.ranks records them).
The error curves and the choice go into the family's history ("ranks").
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from globe.core.mixing import compose
from globe.core.shape import BankShape
from globe.errors import ConfigError
from globe.fit.config import RANK_ALLOCATIONS
from globe.fit.costs import declare_cost
from globe.fit.solvers.adapters import FinalizeOptions, finalize
from globe.fit.solvers.problem import Factors, SolverProblem

log = logging.getLogger(__name__)


def headroom_rank(r: int, p: int, d: int, headroom: float) -> int:
    """r_max the sensitivity allocation fits at: headroom * r, within min(p, d)."""
    return max(r, min(p, d, int(math.ceil(headroom * r))))


def nesting_rotation(adapters: torch.Tensor, codes: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """R [r, r] orthogonal, rows = directions of the r-space by decreasing energy of sym(A^T A M M^T) summed over
    experts (adapters [n, p, r], codes [n, m], bank [m, r, d]; phi = identity)."""
    r = bank.shape[1]
    g = torch.zeros(r, r, dtype=torch.float64)
    for lo in range(0, codes.shape[0], chunk):
        mixed = compose(codes[lo:lo + chunk], bank).double()                         # [c, r, d]
        a = adapters[lo:lo + chunk].double()
        prod = (a.transpose(1, 2) @ a) @ (mixed @ mixed.transpose(1, 2))           # [c, r, r]
        g += (prod + prod.transpose(1, 2)).sum(0).cpu() / 2
    _, vecs = torch.linalg.eigh(g)
    return vecs.flip(1).T.float()                                                    # rows: leading first


def rank_grid(r_max: int, step: int, include: int | None = None) -> list[int]:
    """The candidate ranks: multiples of step (0: r_max / 8) up to r_max, r_max, and `include` (the uniform r, so
    that the uniform choice is one of the allocations)."""
    step = step or max(1, r_max // 8)
    return sorted({*range(step, r_max + 1, step), r_max, *([include] if include and include <= r_max else [])})


def greedy_allocation(errors: dict[int, list[float]], grid: list[int], cost: list[int], limit: int,
                      bank_cost: int = 0) -> list[int]:
    """Per layer, the grid index of its rank. errors[l][g]: layer l's error at grid[g]; cost[l]: parameters per unit
    rank of layer l; bank_cost: parameters per bank row (m d), charged up to the largest rank any layer uses (the
    stored bank is cut there); limit: parameters to spend on adapters and bank. Repeatedly raises the layer with the
    largest error drop per added parameter (its adapters, and the bank rows it adds past the current largest
    rank) while the total stays within the limit."""
    layers = len(cost)
    pick = [0] * layers

    def total(ranks: list[int]) -> int:
        return sum(cost[l] * grid[ranks[l]] for l in range(layers)) + bank_cost * max(grid[g] for g in ranks)
    spent = total(pick)
    while True:
        best, best_gain, best_total = None, 0.0, spent
        for l in range(layers):
            if pick[l] + 1 >= len(grid):
                continue
            raised = pick[:l] + [pick[l] + 1] + pick[l + 1:]
            now = total(raised)
            if now > limit:
                continue
            gain = (errors[l][pick[l]] - errors[l][pick[l] + 1]) / max(now - spent, 1)
            if best is None or gain > best_gain:
                best, best_gain, best_total = l, gain, now
        if best is None:
            return pick
        spent = best_total
        pick[best] += 1


def sensitivity_stage(problem, fitted, budget_rank: int):
    """fitted (at r_max) -> fitted with a rank per layer (adapters zero past r_l, fitted.ranks set)."""
    cfg, t = problem.cfg, problem.cfg.train
    if fitted.phi != "identity":
        raise ConfigError(f"ranks.allocation=sensitivity needs phi identity (the rotation of the r-space leaves "
                          f"W_hat unchanged only then), not {fitted.phi!r}")
    if problem.shard.distributed:
        raise ConfigError("ranks.allocation=sensitivity runs in one process; drop --nproc or use uniform ranks")
    target, norm, m, r_max = problem.spaces.target, fitted.norm, fitted.bank.shape[0], fitted.bank.shape[1]
    rot = nesting_rotation(fitted.adapters, fitted.codes, fitted.bank, t.chunk_size).to(fitted.bank)
    bank = torch.einsum("kr,mrd->mkd", rot, fitted.bank).contiguous()                 # B_j -> R B_j
    ids = problem.ids
    layers = sorted({int(l) for l in ids[:, 0].tolist()})
    position = torch.searchsorted(torch.tensor(layers), ids[:, 0].long().contiguous())
    experts = torch.bincount(position, minlength=len(layers)).tolist()
    grid = rank_grid(r_max, cfg.ranks.step, budget_rank)
    solver = SolverProblem(target, norm, problem.objective)
    options = FinalizeOptions(phi=fitted.phi, chunk_size=t.chunk_size, ridge=t.ridge)
    errors: dict[int, list[float]] = {l: [] for l in range(len(layers))}
    for k in grid:
        sq = finalize(solver, Factors(bank[:, :k], fitted.codes), options, keep_adapters=False).sq_err
        per_layer = torch.zeros(len(layers), dtype=torch.float64).index_add_(0, position, sq)
        for l in range(len(layers)):
            errors[l].append(float(per_layer[l]))
    p, d = target.shape[1], target.shape[2]
    limit = BankShape.uniform(m, budget_rank, len(layers)).params(tuple(experts), p, d, 0)   # bank + adapters
    pick = greedy_allocation(errors, grid, [e * p for e in experts], limit, bank_cost=m * d)
    ranks = tuple(grid[g] for g in pick)
    top = max(ranks)                                          # the stored bank: rows up to the largest rank used
    bank = bank[:, :top].contiguous()
    adapters = torch.zeros_like(fitted.adapters[:, :, :top])
    sq_err = torch.empty_like(fitted.sq_err)
    codes = fitted.codes
    for k in sorted(set(ranks)):
        adapted = finalize(solver, Factors(bank[:, :k], fitted.codes), options)
        rows = torch.tensor([ranks[int(pos)] == k for pos in position])
        adapters[rows, :, :k] = adapted.adapters[rows]
        sq_err[rows] = adapted.sq_err[rows]
        codes = adapted.codes                                                         # simplex codes, same for all k
    log.info("%s: ranks per layer %s (grid %s, uniform r=%d, r_max=%d)", problem.family, list(ranks), grid,
             budget_rank, r_max)
    history = {**fitted.history, "ranks": [{"grid": grid, "errors": [errors[l] for l in range(len(layers))],
                                            "ranks": list(ranks), "uniform_r": budget_rank}]}
    return dataclasses.replace(fitted, bank=bank, adapters=adapters, codes=codes, sq_err=sq_err, history=history,
                               ranks=None if len(set(ranks)) == 1 else ranks)   # one rank = the cut bank's rows


ALLOCATIONS: dict[str, Callable | None] = {"uniform": None, "sensitivity": sensitivity_stage}
assert set(ALLOCATIONS) == set(RANK_ALLOCATIONS), "globe.fit.config.RANK_ALLOCATIONS names every allocation"


# ---- the declared cost of the ranks phase (globe.fit.costs; s: globe.fit.planning.estimate.FitShape at r_max) ----

def ranks_memory(s) -> int:
    """Peak bytes of the ranks phase: the fit it starts from and the rotated bank, the new adapters, and one exact
    refit pass that keeps its adapters (finalize's own peak)."""
    if s.rank_step < 0:
        return 0
    from globe.fit.solvers.adapters import finalize_memory
    return finalize_memory(s) + s.bank + s.adapters


def ranks_seconds(s, q) -> float:
    """The nesting rotation (mixed atoms and two r x r products per expert), one exact refit pass per rank of the
    grid (at that rank), and the final refits at the chosen ranks (planned as two passes at r_max)."""
    if s.rank_step < 0:
        return 0.0
    from globe.fit.costs import compose_seconds
    from globe.fit.solvers.adapters import finalize_seconds
    nesting = compose_seconds(s, q) + s.n * (2 * s.p * s.r * s.r + 2 * s.r * s.r * s.d) / (q.wd32 / 2)
    grid = rank_grid(s.r, s.rank_step)
    return nesting + sum(finalize_seconds(s.with_(r=k), q) for k in grid) + 2 * finalize_seconds(s, q)


declare_cost("ranks", ranks_memory, ranks_seconds)
