"""The shape and warm-start stages of a family fit (see globe.fit.engine).

shape: (m, r) from the config, or chosen on the data to meet bank.budget. The per-expert SVDs are computed once
(expert_factors) for every probed rank and kept in the returned `Shape` for the warm start. Distributed: each
rank factors its experts, the covariance is all-reduced, rank 0 chooses from the gathered spectra and stacked
targets and broadcasts.
warm_starts: every restart's (bank, codes, temperature), drawn in order from the generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from globe.device import acc_dtype
from globe.fit.solvers.budget import candidate_shapes, choose_shape, shared_shapes
from globe.fit.config import FitConfig
from globe.fit.constants import SHAPE_PROBES
from globe.fit.warm_starts.base import warm_start
from globe.fit.warm_starts.targets import align_factors, aligned_targets, expert_factors


@dataclass
class Shape:
    """The bank shape, with the solver's per-expert factors when it computed them (reused by the warm start)."""

    m: int
    r: int
    factors: torch.Tensor | None = None   # [n_k, rmax, d] S V^T of the normalised experts
    cov: torch.Tensor | None = None       # [d, d] sum_i W_i^T W_i over every rank


@dataclass
class WarmStart:
    """One restart's starting point."""

    bank: torch.Tensor                    # [m, r, d]
    codes: torch.Tensor                   # [n_k, m]
    temperature: float


def gram64(x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """x @ x.T in fp64 (fp32 on MPS) for x [N, D]: at once for fp32 x, by row blocks (upcast per block) for
    narrower x."""
    acc = acc_dtype(x.device)
    if x.dtype == torch.float32:
        return x.to(acc) @ x.to(acc).T
    n = x.shape[0]
    out = torch.empty(n, n, dtype=acc, device=x.device)
    for lo in range(0, n, chunk):
        xi = x[lo:lo + chunk].to(acc)
        for lo2 in range(0, lo + chunk, chunk):
            block = xi @ x[lo2:lo2 + chunk].to(acc).T
            out[lo:lo + chunk, lo2:lo2 + chunk] = block
            out[lo2:lo2 + chunk, lo:lo + chunk] = block.T
    return out


def probe_ranks(n: int, p: int, d: int, cfg: FitConfig) -> list[int]:
    """Up to SHAPE_PROBES ranks spread over the candidate (m, r) shapes of the budget solver."""
    b = cfg.bank
    cands = candidate_shapes(n, p, d, b.budget, cfg.sparsity.target_support)
    if b.r is not None:
        cands = [(m, r) for m, r in cands if r == b.r] or cands
    grid = sorted({r for _, r in cands})
    return grid[:: max(1, len(grid) // (SHAPE_PROBES - 1))][:SHAPE_PROBES]


def shape_stage(problem) -> Shape:
    """(m, r) of the bank for the problem's family (see the module docstring)."""
    weights, norm, cfg, shard = problem.spaces.work, problem.norm, problem.cfg, problem.shard
    (_, p, d), b, k, n = weights.shape, cfg.bank, cfg.sparsity.target_support, shard.n
    if b.m is not None and b.r is not None:
        return Shape(b.m, b.r)
    probe = probe_ranks(n, p, d, cfg)
    if not probe:                                        # no shape fits: every rank raises the same ConfigError
        return Shape(*choose_shape(n, p, d, b.budget, k, torch.zeros(n, 0)))
    raw = candidate_shapes(n, p, d, b.budget, k)
    added = set(shared_shapes(raw, n, p, d, b.budget, k)) - set(raw)      # the guard's (2 x support, solved r)
    rmax = max([*probe, *(r for _, r in added)])                           # its warm start reuses these SVDs
    svals, factors, cov = expert_factors(weights, norm, rmax, cfg.train.chunk_size, problem.device)
    shard.comm.all_reduce(cov)
    svals = shard.comm.gather_rows(svals, n)                                # [N, min(p, d)] on rank 0
    stacked = {}
    for r in probe:
        x = shard.comm.gather_rows(align_factors(factors, cov, r, cfg.train.chunk_size), n)
        if x is not None:
            stacked[r] = torch.linalg.svdvals(gram64(x.reshape(n, -1))).sqrt().cpu()
        del x
    m, r = choose_shape(n, p, d, b.budget, k, svals, stacked, b.r) if shard.is_main else (0, 0)
    m, r = shard.from_main((m, r))
    return Shape(b.m if b.m is not None else m, r, factors, cov)


def warm_start_stage(problem, shape: Shape) -> list[WarmStart]:
    """Every restart's warm start, drawn from the generator as it is now (the start of the family), from aligned
    targets of rank r: the solver's factors when it computed them, else one more read of the weights."""
    cfg, chunk = problem.cfg, problem.cfg.train.chunk_size
    if shape.factors is not None and shape.r <= shape.factors.shape[1]:    # reuse the solver's SVDs
        targets = align_factors(shape.factors, shape.cov, shape.r, chunk)
    else:
        targets = aligned_targets(problem.spaces.work, problem.norm, shape.r, chunk, problem.device, problem.comm,
                                  seed=cfg.train.seed)
    shape.factors = shape.cov = None                                        # freed before AM
    starts = [WarmStart(*problem.shard.warm_start(warm_start, targets, shape.m, cfg, problem.gen))
              for _ in range(cfg.train.restarts)]
    del targets                                                             # [N, r, d]: freed before AM
    return starts


@dataclass
class ShapeChoice:
    """The bank shape a family's fit will use, and how it was chosen (for the dry run)."""

    m: int
    r: int
    how: str
    probe_ranks: tuple[int, ...] = ()     # ranks the budget solver probed (empty: it did not run)
    groups: bool = False                  # the nonlinear block start replaces shape, warm start and AM


def family_shape(weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str, objective) -> ShapeChoice:
    """The (m, r) that fit_family will use on these weights, by the fit's own code: the nonlinear block start's
    rule, the configured shape, or (m or r not given) the budget solver run on the data as the fit runs it
    (problem, normalise, shape_stage: one read and one SVD per expert)."""
    from globe.fit.engine.nonlinear import groups_applies, groups_shape
    from globe.fit.engine.problem import FamilyProblem
    from globe.fit.solvers.normalize import Normalizer
    from globe.fit.engine.plain import PLAIN_ATOMS, PLAIN_RANK, plain_applies
    (n, p, d), b = weights.shape, cfg.bank
    if plain_applies(cfg):
        return ShapeChoice(PLAIN_ATOMS, PLAIN_RANK, "plain quantization (budget 0): no base (rank 0) + quantized residuals")
    if groups_applies(cfg, 1, objective):
        m, r, groups = groups_shape(cfg, ids, p, d)
        return ShapeChoice(m, r, f"nonlinear block start: {groups} atoms per layer", groups=True)
    if b.m is not None and b.r is not None and cfg.ranks.allocation == "uniform":
        return ShapeChoice(b.m, b.r, "config")
    problem = FamilyProblem.build(weights, ids, cfg, family, objective=objective)
    problem.norm = Normalizer.fit(problem.spaces.work, cfg.train.chunk_size, problem.names)
    shape = shape_stage(problem)
    how = ("chosen on the data by the fit's budget solver (the dry run read the experts and ran the fit's "
           "normalise + shape stages)")
    r = shape.r
    if cfg.ranks.allocation != "uniform":                 # the fit runs at r_max, the rank stage cuts per layer
        from globe.fit.engine.ranks import headroom_rank
        r = headroom_rank(shape.r, p, d, cfg.ranks.headroom)
        how += f"; fitted at r_max={r} = {cfg.ranks.headroom} x {shape.r}, ranks per layer chosen after the fit"
    return ShapeChoice(shape.m, r, how, tuple(probe_ranks(n, p, d, cfg)))
