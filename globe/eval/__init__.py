"""Evaluation of original and GloBE-compressed models: perplexity, KL and top-1 agreement to the original, speed,
memory, cache hit rate, footprint.

    from globe.eval import evaluate
    report = evaluate(model, tokenizer, text)        # JSON-serialisable dict
    div = divergence(original, compressed, ids)    # KL(original || compressed) per token, top-1 agreement
"""
from __future__ import annotations

from globe.eval.divergence import divergence
from globe.eval.evaluate import describe, evaluate, warm_up_caches
from globe.eval.footprint import routed_footprint
from globe.eval.hits import decode_hit_rate
from globe.eval.perplexity import encode_text, perplexity
from globe.eval.speed import decode_speed, memory_stats, prefill_speed

__all__ = ["divergence",
           "describe", "evaluate", "warm_up_caches", "routed_footprint", "decode_hit_rate", "encode_text", "perplexity",
           "decode_speed", "memory_stats", "prefill_speed"]
