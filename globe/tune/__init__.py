"""Tuning of a fitted model's compressed parameters against the original model's behaviour.

    result, info = distill(model, result, ids, DistillConfig(steps=100))   # model: the original, loaded (fp32)

`distill` trains only the GloBE factors (banks, nonzero code values, adapters, whose columns hold the expert
scales) so that the compressed model's next-token distribution matches the original's on calibration tokens;
attention, routers, shared experts, norms, embeddings and the dense projections never change.
"""
from __future__ import annotations

from globe.tune.config import DistillConfig
from globe.tune.distill import distill

__all__ = ["DistillConfig", "distill"]
