"""Cache hit rate as decoding sees it: held-out text fed one token at a time through the KV cache.

A prefill window of a few hundred tokens routes to nearly every expert, so its hit rate is just capacity / experts;
the number that matters for generation is the per-step rate, measured here by teacher-forced incremental decoding
(the KV cache is restarted every `window` tokens). The loop over tokens is the measurement itself, not the runtime.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from globe.runtime.apply import cache_stats, globe_modules, reset_cache_stats, set_collect_stats


@torch.no_grad()
def decode_hit_rate(model: nn.Module, input_ids: torch.Tensor, tokens: int = 256,
                    window: int = 256) -> dict | None:
    """{"hits", "misses", "hit_rate", "tokens"} over the first `tokens` ids [n], decoded one by one; None when the
    model has no cache (not patched, or not in `cached` mode). Cache contents carry over; counters are reset."""
    if not any(m.cache is not None for m in globe_modules(model).values()):
        return None
    ids = input_ids.reshape(-1)[:tokens].to(next(model.parameters()).device)
    # transformers >= 5.2x names the KV cache `cache`; earlier 5.x releases `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    set_collect_stats(model, True)
    reset_cache_stats(model)
    try:
        for start in range(0, ids.numel(), window):
            past = None
            for token in ids[start:start + window]:
                past = getattr(model(input_ids=token.view(1, 1), use_cache=True, **{key: past}), key)
    finally:
        set_collect_stats(model, False)
    stats = cache_stats(model)
    return {"hits": stats["hits"], "misses": stats["misses"], "hit_rate": stats["hit_rate"], "tokens": ids.numel()}
