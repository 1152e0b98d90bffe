"""The plain weight-space objective sum_i ||W_i - A_i M_i||^2 (R_i = I): the default of every fit."""
from __future__ import annotations

import torch

from globe.fit.objectives.base import Objective, Spaces, register


@register
class WeightSpace(Objective):
    """sum_i ||W_i - A_i M_i||^2: every hook is the identity."""

    name = "weights"
    default = True
    plain_weights = True
    nonlinear_ok = True

    @classmethod
    def for_family(cls, data, family: str, stack, cfg) -> "WeightSpace":
        return WEIGHTS

    def spaces(self, weights: torch.Tensor, chunk: int) -> Spaces:
        return Spaces(original=weights, target=weights, work=weights)

    def right(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """x [hi - lo, rows, d] of experts lo:hi times R_i."""
        return x

    def select(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [c, rows, d] of the given experts [c] times R_i."""
        return x

    def total(self, targets, bounds: list[tuple[int, int]], n: int, p: int, d: int) -> float:
        """sum_i ||W_i R_i / s_i||^2 (the loss normaliser): N p d in unit-RMS space."""
        return float(n * p * d)


WEIGHTS = WeightSpace()
