"""Warm starts for (bank, codes) from aligned targets x [N, r d] (globe.fit.warm_starts.targets): the registry, the
shared helpers, and `warm_start`, which runs the configured one.

A warm start is one module of this folder: a `WarmStartInit` subclass with a `name` (the value of bank.init),
decorated with `@register`, that makes the first atoms (`atoms`, in memory for fp32 targets or streamed for the
bf16 targets of large families), may refine atoms and codes after the first coding (`sweeps`), and declares its
cost for the dry run (`memory`, `seconds`). Add its name to globe.fit.config.INITS to offer it on the command line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from globe.fit.config import FitConfig, SparsityConfig
from globe.fit.registry import Registry
from globe.fit.solvers.linalg import ridge_cholesky
from globe.fit.solvers.sparse_coding import code_chunk
from globe.progress import progress

log = logging.getLogger(__name__)
F4, F8 = 4, 8                 # bytes of fp32 / fp64
ROWS = 64                     # experts (rows of x) upcast to fp32 at once by the streamed variants
COLUMNS = 2**16               # columns of x upcast at once by the streamed TS-PCA


@dataclass(frozen=True)
class WarmStartOptions:
    """What a warm start reads of the FitConfig (built once by warm_start)."""

    init: str                     # bank.init: the registered WarmStartInit
    ridge: float                  # train.ridge
    chunk_size: int               # rows per coding chunk
    sparsity: SparsityConfig      # support target, T_init, method

    @classmethod
    def from_config(cls, cfg: FitConfig) -> WarmStartOptions:
        return cls(init=cfg.bank.init, ridge=cfg.train.ridge, chunk_size=cfg.train.chunk_size, sparsity=cfg.sparsity)


WARM_STARTS: Registry = Registry("globe.fit.warm_starts", "warm start (bank.init)")
register = WARM_STARTS.register


class WarmStartInit:
    """One warm start. x: stacked targets [N, D] (D = r d), fp32 or bf16 (streamed: no fp32 copy of x)."""

    name = ""

    def atoms(self, x: torch.Tensor, m: int, gen: torch.Generator, options: WarmStartOptions,
              streamed: bool) -> torch.Tensor:
        """m unit atoms [m, D] fp32."""
        raise NotImplementedError

    sweep_label = ""

    def sweeps(self, streamed: bool) -> list:
        """Steps (x, atoms, codes) -> (atoms, codes) run after the first coding, under a progress bar named
        sweep_label (default: none). warm_start runs them in its own frame, so no step's input stays referenced."""
        return []

    # ---- costs, for the dry run (s: globe.fit.planning.estimate.FitShape, q: planning.timing.KernelRates) ----
    def memory(self, s, streamed: bool) -> int:
        """Peak bytes of atoms + sweeps beyond the targets x."""
        raise NotImplementedError

    def seconds(self, s, q) -> float:
        """Seconds of atoms + first coding + sweeps."""
        raise NotImplementedError


def rows_mm(x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """x [N, D] @ y [D, k] in y's dtype; x stored in a narrower dtype is upcast a row chunk at a time."""
    if x.dtype == y.dtype:
        return x @ y
    return torch.cat([x[lo:lo + chunk].to(y.dtype) @ y for lo in range(0, x.shape[0], chunk)])


def rows_tmm(x: torch.Tensor, q: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """x [N, D]^T @ q [N, k] in q's dtype, accumulated over row chunks of a narrower x."""
    if x.dtype == q.dtype:
        return x.T @ q
    out = torch.zeros(x.shape[1], q.shape[1], dtype=q.dtype, device=q.device)
    for lo in range(0, x.shape[0], chunk):
        out.addmm_(x[lo:lo + chunk].to(q.dtype).T, q[lo:lo + chunk])
    return out


def _signed(directions: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """Atoms from directions [k, D]: sign so that most experts correlate positively, then +/- pairs up to m."""
    sign = torch.sign(rows_mm(x, directions.T).sum(0)).clamp_min(0) * 2 - 1       # [k]
    directions = directions * sign[:, None]
    first = directions[:1]
    pairs = torch.stack([directions[1:], -directions[1:]], 1).reshape(-1, directions.shape[1])
    return torch.cat([first, pairs])[:m]


def _random_atoms(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    a = torch.randn(k, dim, generator=gen).to(device)
    return a / a.norm(dim=1, keepdim=True)


def _pad(atoms: torch.Tensor, m: int, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill up to m atoms with randomly chosen, slightly perturbed unit targets."""
    if atoms.shape[0] >= m:
        return atoms[:m]
    k = m - atoms.shape[0]
    pick = torch.randint(0, x.shape[0], (k,), generator=gen).to(x.device)
    rows = x[pick].float()
    extra = rows / rows.norm(dim=1, keepdim=True) + 0.1 * _random_atoms(k, x.shape[1], gen, x.device)
    return torch.cat([atoms, extra / extra.norm(dim=1, keepdim=True)])


def encode(x: torch.Tensor, atoms: torch.Tensor, options: WarmStartOptions, temperature: float | None = None):
    """Sparse codes [N, m] of targets x [N, D] against unit atoms, with temperature control; returns (codes, T)."""
    gram = atoms @ atoms.T
    chol = ridge_cholesky(gram, options.ridge)
    temp = options.sparsity.t_init if temperature is None else temperature
    out, chunk = [], options.chunk_size
    for lo in range(0, x.shape[0], chunk):
        codes, _, temp = code_chunk(x[lo:lo + chunk].float() @ atoms.T, gram, chol, temp,
                                    options.sparsity, options.ridge)
        out.append(codes)
    return torch.cat(out), temp


def encode_seconds(s, q) -> float:
    """Seconds of encode on all targets (the codes @ atoms products dominate)."""
    nd = s.n * s.r * s.d
    return 2 * nd * s.m / q.bank + nd * 4 / q.stream


def warm_start(targets: torch.Tensor, m: int, cfg: FitConfig, gen: torch.Generator):
    """(bank [m, r, d], codes [N, m], temperature) for the configured init (bank.init) from aligned targets
    [N, r, d] (fp32, or bf16 for large families: every init then streams them)."""
    n, r, d = targets.shape
    x = targets.reshape(n, r * d)
    options = WarmStartOptions.from_config(cfg)
    init = WARM_STARTS.get(options.init)()
    streamed = x.dtype != torch.float32                  # large family (bf16 targets): no fp32 copies of x
    atoms = init.atoms(x, m, gen, options, streamed)
    codes, temp = encode(x, atoms, options)
    for sweep in progress(init.sweeps(streamed), init.sweep_label) if init.sweep_label else ():
        atoms, codes = sweep(x, atoms, codes)
    return atoms.reshape(m, r, d).contiguous(), codes, temp
