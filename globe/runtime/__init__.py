"""GloBE runtime: GlobeExperts modules (factored / cached / dense) patched into loaded transformers models.

    from globe.runtime import apply_globe, collect_routing_counts, warm_up, cache_stats
    apply_globe(model, "out/", mode="cached", cache_size=8)
    warm_up(model, collect_routing_counts(model, calibration_ids))
"""
from __future__ import annotations

from globe.core.mixing import SparseCodes, compose, sparse_codes
from globe.io.model import experts_modules, moe_layers
from globe.runtime.apply import (apply_globe, cache_stats, globe_modules, reset_cache_stats, set_collect_stats,
                                 set_mode, validate, warm_up)
from globe.runtime.cache import MixedCache
from globe.runtime.reconstruct import reconstruct_rows
from globe.formats.checkpoint import GLOBE_STATE
from globe.runtime.experts import MODES, PROJECTIONS, GlobeExperts
from globe.runtime.routing import collect_routing_counts

__all__ = ["apply_globe", "cache_stats", "collect_routing_counts", "experts_modules", "globe_modules", "moe_layers",
           "reset_cache_stats", "set_collect_stats", "set_mode", "validate", "warm_up", "MixedCache", "compose",
           "reconstruct_rows", "sparse_codes", "SparseCodes", "GLOBE_STATE", "MODES", "PROJECTIONS", "GlobeExperts"]
