"""What every solver takes: the problem (this rank's experts, their normaliser, the objective, the communicator)
and the state it starts from (bank before codes). Each solver's options are a small dataclass of its own, built
once from the FitConfig by its `from_config` (globe.fit.solvers.varpro.VarProOptions, adam.AdamOptions,
am.AMOptions, nonlinear.NonlinearOptions, adapters.FinalizeOptions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from globe.fit.config import FitConfig
from globe.fit.objectives.base import Objective
from globe.fit.objectives.weights import WEIGHTS
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.normalize import Normalizer


@dataclass(frozen=True)
class SolverProblem:
    """The experts a solver fits and how their error is measured."""

    weights: torch.Tensor               # [n, p, d] this rank's experts, as stored (any dtype, lazy ok)
    norm: Normalizer                    # their scales and squared norms
    objective: Objective = WEIGHTS      # what is minimised (its targets / right / select / total hooks)
    comm: Comm = LOCAL                  # sums over ranks (a no-op in one process)


@dataclass
class Factors:
    """A solver's starting point: the bank, the codes of this rank's experts, their temperature, and the adapters
    where the solver trains them (Adam) or the result carries them."""

    bank: torch.Tensor                          # [m, r, d]
    codes: torch.Tensor                         # [n, m]
    temperature: float = 1.0
    adapters: torch.Tensor | None = None        # [n, p, r] in the normalised space


@dataclass
class FittedFactors:
    """A finished fit of one family: bank, codes, exact adapters and the per-expert squared error."""

    bank: torch.Tensor                          # [m, r, d]
    codes: torch.Tensor                         # [N, m]
    adapters: torch.Tensor                      # [N, p, r]
    sq_err: torch.Tensor                        # [N] fp64, original space


@dataclass(frozen=True)
class VarProOptions:
    """What variable projection (globe.fit.solvers.varpro, both forms) reads of the FitConfig."""

    steps: int                    # L-BFGS iterations
    phi: str                      # bank.phi
    ridge: float                  # train.ridge
    chunk_size: int               # experts per chunk
    precision: str                # train.precision
    method: str                   # sparsity.method (code parametrisation)
    eps: float                    # sparsity.eps (codes pruned below eps * max)
    label: str = "varpro"         # the progress bar's and closing log line's name

    @classmethod
    def from_config(cls, cfg: FitConfig, steps: int | None = None, label: str = "varpro") -> VarProOptions:
        return cls(steps=cfg.train.varpro_steps if steps is None else steps, phi=cfg.bank.phi,
                   ridge=cfg.train.ridge, chunk_size=cfg.train.chunk_size, precision=cfg.train.precision,
                   method=cfg.sparsity.method, eps=cfg.sparsity.eps, label=label)
