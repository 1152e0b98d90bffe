"""Capture what a model's routed-experts modules receive, for checking calibration against it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from globe.io import experts_modules


@contextmanager
def expert_inputs(model: nn.Module) -> Iterator[dict[int, list[tuple]]]:
    """{layer: [the positional arguments of each call of its experts module, detached copies]} while in the block."""
    captured: dict[int, list[tuple]] = {}

    def keep(layer: int):
        def hook(module, args):
            captured.setdefault(layer, []).append(tuple(a.detach().clone() for a in args))
        return hook

    handles = [m.register_forward_pre_hook(keep(l)) for l, m in experts_modules(model).items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
