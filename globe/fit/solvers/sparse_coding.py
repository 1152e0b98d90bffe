"""Sparse codes: entmax/sparsemax support selection at temperature T, non-negative least squares on the
support (one active-set loop for a shared or a per-expert Gram), the pruning rule, the temperature controller
(code_chunk), and the inverse map codes -> logits used by refinement."""
from __future__ import annotations

import math

import torch
from entmax import entmax15, sparsemax

from globe.fit.config import SparsityConfig
from globe.fit.constants import NNLS_SWEEPS, TEMPERATURE_RETRIES
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.linalg import solve_right


MAPPINGS = {"entmax15": entmax15, "sparsemax": sparsemax,       # sparse simplex maps (sparsity.method)
            "softmax": torch.softmax,                                # dense simplex map (the nonlinear fit)
            "signed": lambda x, dim: x}                              # real codes (the nonlinear fit's signed codes)


def mapping(method: str):
    """The mapping alpha = f(logits / T) named by `method` (MAPPINGS)."""
    return MAPPINGS[method]


def support_logits(corr: torch.Tensor, gram_chol: torch.Tensor) -> torch.Tensor:
    """Scale-free logits from the unconstrained least-squares coefficients over all atoms.

    corr: [n, m] correlations <Y_i, B_j>; gram_chol: [m, m] Cholesky of the (ridged) atom Gram.
    Returns [n, m] in [-1, 1] (each row divided by its largest magnitude).
    """
    coef = solve_right(corr, gram_chol)                               # [n, m]
    return coef / coef.abs().amax(-1, keepdim=True).clamp_min(1e-30)


def _solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x [n, k] with system [n, k, k] @ x = rhs [n, k]; a singular system (duplicate atoms with ridge 0) gets the
    minimum-norm solution instead of an error."""
    x, info = torch.linalg.solve_ex(system, rhs.unsqueeze(-1))
    if bool((info > 0).any()):
        bad = info > 0
        x[bad] = torch.linalg.pinv(system[bad]) @ rhs[bad].unsqueeze(-1)
    return x.squeeze(-1)


def _active_set_nnls(sub_gram: torch.Tensor, rhs_all: torch.Tensor, valid: torch.Tensor, ridge: float,
                     scale: torch.Tensor, sweeps: int) -> torch.Tensor:
    """The one NNLS loop: solve on each row's support, drop the negative values, repeat (`sweeps` times at most).
    sub_gram [n, k, k], rhs_all/valid [n, k], scale: ridge scale (scalar or [n, 1, 1]). Returns values [n, k]."""
    eye = torch.eye(rhs_all.shape[1], dtype=sub_gram.dtype, device=sub_gram.device)
    x = torch.zeros_like(rhs_all)
    for _ in range(sweeps):
        vv = valid[:, :, None] & valid[:, None, :]
        system = torch.where(vv, sub_gram, eye.expand_as(sub_gram)) + ridge * scale * eye
        x = _solve(system, torch.where(valid, rhs_all, torch.zeros_like(rhs_all)))
        neg = valid & (x < 0)
        if not bool(neg.any()):
            break
        valid = valid & ~neg
    return torch.where(valid, x.clamp_min(0.0), torch.zeros_like(x))


def nnls_on_support(corr: torch.Tensor, gram: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                    ridge: float, sweeps: int = NNLS_SWEEPS) -> torch.Tensor:
    """Non-negative least squares restricted to each row's support, with one shared Gram.

    corr: [n, m], gram: [m, m], idx/valid: [n, k]. Returns values [n, k] (0 on invalid slots).
    """
    sub = gram[idx[:, :, None], idx[:, None, :]]                       # [n, k, k]
    scale = gram.diagonal().mean().clamp_min(1e-30)
    return _active_set_nnls(sub, torch.gather(corr, 1, idx), valid, ridge, scale, sweeps)


def select_support(corr: torch.Tensor, gram_chol: torch.Tensor, temperature: float, method: str,
                   max_support: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Support of each row: the non-zeros of mapping(logits / T), at most max_support of the largest.
    Returns idx [n, k], valid [n, k]."""
    probs = mapping(method)(support_logits(corr, gram_chol) / temperature, dim=-1)   # [n, m]
    k = max(int((probs > 0).sum(-1).max()), 1)
    k = min(k, max_support) if max_support else k
    top, idx = probs.topk(k, dim=-1)
    return idx, top > 0


def prune_codes(codes: torch.Tensor, eps: float) -> torch.Tensor:
    """The pruning rule of every stage: zero the codes [n, k] below eps * the row's largest magnitude."""
    keep = codes.abs() >= eps * codes.abs().amax(-1, keepdim=True)
    return torch.where(keep, codes, torch.zeros_like(codes))


def finish_codes(values: torch.Tensor, idx: torch.Tensor, corr: torch.Tensor, eps: float) -> torch.Tensor:
    """Prune values [n, k] >= 0, scatter to [n, m]; an empty row keeps its best atom."""
    values = prune_codes(values, eps)
    codes = torch.zeros_like(corr).scatter_(1, idx, values)
    empty = codes.amax(-1) <= 0
    if bool(empty.any()):
        best = corr[empty].argmax(-1)
        codes[empty.nonzero().squeeze(-1), best] = corr[empty].amax(-1).abs().clamp_min(1e-12)
    return codes


def sparse_code(corr: torch.Tensor, gram: torch.Tensor, gram_chol: torch.Tensor, temperature: float,
                cfg: SparsityConfig, ridge: float) -> torch.Tensor:
    """Codes [n, m] >= 0 for targets with correlations corr [n, m] against unit atoms of Gram [m, m]:
    entmax(logits / T) picks the support, NNLS on it gives the values, then pruning."""
    idx, valid = select_support(corr, gram_chol, temperature, cfg.method)
    return finish_codes(nnls_on_support(corr, gram, idx, valid, ridge), idx, corr, cfg.eps)


def support_sizes(codes: torch.Tensor) -> torch.Tensor:
    """Number of non-zero codes per row: [n]."""
    return (codes != 0).sum(-1)


def update_temperature(temperature: float, median_support: float, cfg: SparsityConfig) -> float:
    """One controller step towards the target median support.

    With alpha = entmax(logits / T) a larger T spreads mass over more atoms, so T shrinks when the support is
    above target: T <- clamp(T * exp(-eta * (median / target - 1)), t_min, t_max).
    """
    step = math.exp(-cfg.eta * (median_support / cfg.target_support - 1.0))
    return float(min(max(temperature * step, cfg.t_min), cfg.t_max))


def codes_to_logits(codes: torch.Tensor, temperature: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with mapping(logits / T) == codes / rowsum exactly, plus the row sums [n] (fold into adapters).

    entmax-1.5 on the support is p = (z/2 - tau)^2, so z = 2 sqrt(p); sparsemax is p = z - tau, so z = p.
    Off-support logits sit at -1 (below the threshold tau = 0).
    """
    sums = codes.sum(-1).clamp_min(1e-30)                             # [n]
    probs = codes / sums[:, None]
    z = 2.0 * probs.sqrt() if method == "entmax15" else probs
    z = torch.where(codes > 0, z, torch.full_like(z, -1.0))
    return z * temperature, sums


def weighted_support_gram(grams: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor,
                          max_bytes: int = 256 * 2**20, low_bank: torch.Tensor | None = None) -> torch.Tensor:
    """K_i[a, b] = <G_i B_{idx_ia}, B_{idx_ib}> on each row's support: grams [n, r, r], idx [n, k] -> [n, k, k].

    Experts are processed in groups so that the gathered atoms stay under max_bytes. low_bank (the bank in bf16)
    computes G_i B_a, the dominant product (2 k r^2 d flops per expert), from rounded operands (error ~1e-4,
    averaged over r d terms); the final contraction is fp32: rounding K itself to bf16 (~2e-3) was measured to
    double the median support, as near-zero NNLS values then survive pruning.
    """
    n, k = idx.shape
    _, r, d = bank.shape
    src = bank if low_bank is None else low_bank
    group = max(1, max_bytes // (2 * k * r * d * src.element_size()))
    out = torch.empty(n, k, k, dtype=bank.dtype, device=bank.device)
    for lo in range(0, n, group):
        atoms = src[idx[lo:lo + group]]                                     # [g, k, r, d]
        weighted = grams[lo:lo + group, None].to(src.dtype) @ atoms         # [g, k, r, d]
        out[lo:lo + group] = (weighted.flatten(2) @ atoms.flatten(2).transpose(1, 2)).to(bank.dtype) \
            if low_bank is None else weighted.flatten(2).float() @ atoms.flatten(2).float().transpose(1, 2)
    return out


def weighted_nnls(rhs: torch.Tensor, sub_gram: torch.Tensor, valid: torch.Tensor, ridge: float,
                  sweeps: int = NNLS_SWEEPS) -> torch.Tensor:
    """NNLS with a per-row Gram: rhs [n, k], sub_gram [n, k, k], valid [n, k] -> values [n, k] >= 0."""
    scale = sub_gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    return _active_set_nnls(sub_gram, rhs, valid, ridge, scale, sweeps)


def code_chunk(corr: torch.Tensor, gram: torch.Tensor, gram_chol: torch.Tensor, temperature: float,
               sparsity: SparsityConfig, ridge: float, retries: int = TEMPERATURE_RETRIES, comm: Comm = LOCAL):
    """Codes for one chunk with temperature control: re-codes with a corrected T while the chunk's median support
    is off target by more than 1. Returns (codes, T used for them, T for the next chunk).

    Distributed, the chunk is the union of every rank's chunk at this step (median over all of them); a rank
    whose shard has run out passes an empty corr [0, m] and only takes part in the reductions."""
    for _ in range(retries):
        used = temperature
        codes = sparse_code(corr, gram, gram_chol, used, sparsity, ridge) if corr.shape[0] else torch.zeros_like(corr)
        median = comm.median(support_sizes(codes), corr.shape[1])
        temperature = update_temperature(used, median, sparsity)
        if abs(median - sparsity.target_support) <= 1 or temperature == used:
            break
    return codes, used, temperature
