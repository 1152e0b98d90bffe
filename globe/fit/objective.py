"""What a fit minimises: the `Objective` interface, and the plain weight-space objective.

An objective is sum_i ||(W_i - A_i M_i) R_i||_F^2 over the experts of a family, with mixed atoms
M_i = phi(sum_j alpha_ij B_j) and a right weighting R_i. The stages that solve for adapters or refine the bank
(globe.fit.adapters.finalize, globe.fit.refine.varpro_refine / adam_refine) only ever call these methods, so a new
objective is one new class, not a new branch in every stage:

- `WeightSpace` (R_i = I): the default, ||W_i - W_hat_i||^2.
- `globe.fit.activation.ActivationObjective` (R_i = g_i L_i, L_i L_i^T the input second moment of expert i).
- room for more: a nonlinear-phi objective or an output-space objective (R_i from calibration outputs) implement
  the same methods; `after_alternation` is where such an objective plugs in its own refinement stage.

Spaces: an objective may fit a transformed copy of the weights (`spaces`): `target` is what the objective
compares against (Lambda W for channel weights, else W), `work` the space the warm start and alternating
minimisation run in (W L_g for a globally whitened start, else `target`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from globe.fit.normalize import Normalizer


@dataclass
class Spaces:
    """The weights a family fit sees: as given, as the objective compares them, as AM works on them."""

    original: torch.Tensor            # [N, p, d] as stored
    target: torch.Tensor              # [N, p, d] what the objective compares against
    work: torch.Tensor                # [N, p, d] the space of warm start + AM
    factor: torch.Tensor | None = None   # [d, d] right factor taking `target` to `work` (None: work is target)


@dataclass
class Solution:
    """(bank, codes) with the normaliser of the space they were fitted in and the losses so far."""

    bank: torch.Tensor                # [m, r, d]
    codes: torch.Tensor               # [N, m]
    norm: Normalizer
    temperature: float
    history: dict = field(default_factory=dict)


class WeightSpace:
    """sum_i ||W_i - A_i M_i||^2: every hook is the identity."""

    name = "weights"
    stage_name: str | None = None     # timing name of after_alternation (None: the objective has no stage)
    cache_targets = False             # whether refine keeps the (weighted) target chunks in memory

    def spaces(self, weights: torch.Tensor, chunk: int) -> Spaces:
        return Spaces(original=weights, target=weights, work=weights)

    def right(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """x [hi - lo, rows, d] of experts lo:hi times R_i."""
        return x

    def select(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [c, rows, d] of the given experts [c] times R_i."""
        return x

    def targets(self, weights: torch.Tensor, norm: Normalizer, lo: int, hi: int, device) -> torch.Tensor:
        """Normalised experts lo:hi in the objective's space: W_i R_i / s_i, [c, p, d] fp32."""
        return self.right(norm.chunk(weights, lo, hi, device), lo, hi)

    def total(self, targets, bounds: list[tuple[int, int]], n: int, p: int, d: int) -> float:
        """sum_i ||W_i R_i / s_i||^2 (the loss normaliser): N p d in unit-RMS space."""
        return float(n * p * d)

    def unscale(self, adapters: torch.Tensor) -> torch.Tensor:
        """Adapters fitted in the target space -> adapters of the original weights."""
        return adapters

    def work_error(self, spaces: Spaces) -> str:
        """What the warm start, AM and the first variable projection minimise, in words (for logs and bars)."""
        return "weight error"

    def after_alternation(self, problem, solution: Solution) -> Solution:
        """The objective's own stage after [AM, VarPro] x cycles (weight space: none)."""
        return solution

    def metrics(self, problem, fam, sq_err: torch.Tensor) -> dict:
        """Extra metrics of the finished family (weight space: none)."""
        return {}


WEIGHTS = WeightSpace()
