"""Evaluation of original and GloBE-compressed models: perplexity, speed, memory, cache hit rate, footprint.

    from globe.eval import evaluate
    report = evaluate(model, tokenizer, text)        # JSON-serialisable dict
"""
from __future__ import annotations

from globe.eval.evaluate import describe, evaluate, warm_up_caches
from globe.eval.footprint import routed_footprint
from globe.eval.hits import decode_hit_rate
from globe.eval.perplexity import encode_text, perplexity
from globe.eval.speed import decode_speed, memory_stats, prefill_speed

__all__ = ["describe", "evaluate", "warm_up_caches", "routed_footprint", "decode_hit_rate", "encode_text", "perplexity",
           "decode_speed", "memory_stats", "prefill_speed"]
