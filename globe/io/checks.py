"""Finite-value check of tensors read from a checkpoint (used by the eager reader and the lazy view alike)."""
from __future__ import annotations

import torch

from globe.errors import NumericalError


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """NumericalError naming `name` (and the first bad index) if `tensor` holds NaN or Inf."""
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(int(i) for i in bad[0].tolist())
    raise NumericalError(f"tensor {name!r} holds {bad.shape[0]} NaN/Inf value(s) (first at index {first}); "
                         f"the checkpoint is damaged, re-download or repair it")
