"""Parameter accounting of a fit and the (m, r) solver that meets a parameter budget."""
from __future__ import annotations

import logging
import math

import torch

from globe.core.params import dense_params
from globe.errors import ConfigError

log = logging.getLogger(__name__)


def candidate_shapes(n: int, p: int, d: int, budget: float, support: int, step: int = 8) -> list[tuple[int, int]]:
    """All (m, r) with r a multiple of `step` (or r < step) whose stored params fit the budget, m maximal."""
    limit = budget * dense_params(n, p, d)
    out = []
    for r in sorted({*range(step, min(p, d) + 1, step), *range(1, min(step, min(p, d) + 1))}):
        m = math.floor((limit - n * p * r - n * support - n) / (r * d))
        m = min(m, n * r)                         # more atoms than n * r cannot be used
        if m >= max(support, 2):
            out.append((m, r))
    return out


SHARED_ATOMS_PER_SUPPORT = 2   # k: a bank has at most k * support atoms (see shared_shapes)


def shared_shapes(cands: list[tuple[int, int]], n: int, p: int, d: int, budget: float, support: int,
                  k: int | None = None) -> list[tuple[int, int]]:
    """The candidates with sparsity taken into account: each expert mixes only `support` of the m atoms, so a bank
    of m > k * support atoms (k = 2: two experts' supports may then be disjoint, the bank stops being shared) is
    spent on atoms no expert sees together. Every such shape is replaced by the shape with m = k * support atoms and
    the largest rank the budget then allows (r solved from m, so the budget is still used); shapes within the
    bound are kept as they are. k: None = SHARED_ATOMS_PER_SUPPORT."""
    cap = (SHARED_ATOMS_PER_SUPPORT if k is None else k) * support
    kept = [(m, r) for m, r in cands if m <= cap]
    if len(kept) == len(cands):
        return cands
    limit = budget * dense_params(n, p, d)
    r = min(int((limit - n * support - n) // (cap * d + n * p)), min(p, d))    # m r d + n p r + n s + n <= limit
    if r >= 1 and cap <= n * r and (cap, r) not in kept:
        kept.append((cap, r))
    return sorted(kept, key=lambda c: c[1])


def spectral_error(svals: torch.Tensor, target_svals: torch.Tensor | None, m: int, r: int) -> float:
    """Proxy of the squared error of shape (m, r): per-expert rank-r tail + bank tail at m components.

    svals: [N, k] singular values of the normalised experts; target_svals: singular values of the stacked
    aligned targets (rank-r), or None to use only the rank-r floor.
    """
    floor = float(svals[:, r:].square().sum())
    if target_svals is None:
        return floor
    return floor + float(target_svals[m:].square().sum())


def choose_shape(n: int, p: int, d: int, budget: float, support: int, svals: torch.Tensor,
                 stacked_svals: dict[int, torch.Tensor] | None = None, rank: int | None = None) -> tuple[int, int]:
    """(m, r) meeting the budget with the smallest spectral error proxy (computed on the data) among the
    sparsity-aware candidates (shared_shapes: at most 2 x support atoms); a given `rank`
    (bank.r without bank.m) restricts the choice to that r when the budget admits it."""
    cands = candidate_shapes(n, p, d, budget, support)
    at_rank = [(min(m, SHARED_ATOMS_PER_SUPPORT * support), r) for m, r in cands if r == rank]
    cands = at_rank or shared_shapes(cands, n, p, d, budget, support)
    if not cands:
        raise ConfigError(f"budget {budget:.3f} is too small for N={n}, p={p}, d={d} with support {support}: "
                          f"raise --budget or lower --target-support")
    scored = []
    for m, r in cands:
        ts = None if stacked_svals is None else stacked_svals.get(r)
        scored.append((spectral_error(svals, ts, m, r), -r, m, r))
    best = min(scored)
    log.info("budget %.3f: chose m=%d r=%d (proxy error %.4g) among %d shapes", budget, best[2], best[3],
             best[0], len(cands))
    return best[2], best[3]


def total_cut_budget(reduction: float, inv, families: tuple[str, ...] = ("gate", "up"),
                     support: int = 12) -> tuple[float, int]:
    """(per-family budget, target support) that cuts `reduction` of ALL of a checkpoint's params (inv: its
    globe.io Inventory) by shrinking every listed family by the same fraction; the support is lowered (8, 4, 2, 1)
    until some bank shape fits the budget."""
    dense = inv.params["gate"]
    budget = 1.0 - reduction * inv.total_params / (len(families) * dense)
    if not 0 < budget < 1:
        share = dense / inv.total_params                       # one family's part of all parameters
        largest = len(families) * share
        more = (f"; --families gate,up,down allows up to {min(3 * share, 1):.1%}"
                if set(families) != {"gate", "up", "down"} and reduction > 0 else "")
        raise ConfigError(f"--total-cut {reduction:g}: impossible, it needs budget {budget:.3f} per family, outside "
                          f"(0, 1); shrinking {','.join(families)} can cut less than {largest:.1%} of all "
                          f"{inv.total_params:,} parameters (ask for less{more})")
    n = len(inv.moe_layers) * inv.num_experts
    for k in sorted({support, 8, 4, 2, 1}, reverse=True):
        if k <= support and candidate_shapes(n, inv.p, inv.d, budget, k):
            return budget, k
    raise ConfigError(f"budget {budget:.4f} admits no bank shape for N={n}, p={inv.p}, d={inv.d}")
