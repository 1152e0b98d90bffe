"""evaluate(): perplexity, prefill/decode speed, memory, cache hit rate and routed-expert footprint as one dict.

    report = evaluate(model, tokenizer, heldout_text, calibration_text=calib)
    json.dumps(report)          # plain Python numbers and strings only

Works on an original model and on a GloBE-patched one (any mode). With a cached model and calibration text the
caches are warmed up from routing counts first; the hit rate is then counted while decoding the end of the text
token by token (see globe.eval.hits), which is what generation sees.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from globe.eval.footprint import routed_footprint
from globe.eval.hits import decode_hit_rate
from globe.eval.perplexity import encode_text, perplexity
from globe.eval.speed import decode_speed, memory_stats, prefill_speed
from globe.io.model import model_arch
from globe.runtime.apply import globe_modules, warm_up
from globe.runtime.memory import held_breakdown, held_packed_bytes
from globe.runtime.routing import collect_routing_counts

log = logging.getLogger(__name__)


def _ids(tokenizer, text: str | torch.Tensor) -> torch.Tensor:
    return text.reshape(-1).long() if isinstance(text, torch.Tensor) else encode_text(tokenizer, text)


def describe(model: nn.Module) -> dict:
    """Architecture, dtype, device and GloBE mode of a model."""
    spec, _ = model_arch(model)
    modes = sorted({m.mode for m in globe_modules(model).values()})
    param = next(model.parameters())
    return {"model_type": spec.model_type, "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device), "globe_mode": modes[0] if len(modes) == 1 else (modes or None)}


def warm_up_caches(model: nn.Module, tokenizer, calibration: str | torch.Tensor, window: int = 256) -> dict | None:
    """Warm every layer's cache from routing counts on calibration text; the loaded experts per layer."""
    if not any(m.cache is not None for m in globe_modules(model).values()):
        return None
    counts = collect_routing_counts(model, _ids(tokenizer, calibration), window=window)
    loaded = warm_up(model, counts)
    return {str(layer): experts for layer, experts in loaded.items()}


def memory_breakdown(model: nn.Module, rss_mb: float) -> dict[str, float]:
    """Where the process's memory goes, in MiB: the model's weights (stored tensors; packed_mb of them are packed
    quantized factors), its caches (tensors the runtime rebuilds from them) and the framework (the rest of the
    resident set: Python, torch, transformers, the tokenizer, allocator slack). On an accelerator the weights and caches live in device memory, so the whole RSS
    is framework."""
    held = held_breakdown(model)
    weights, caches = held["weights"] / 2**20, held["caches"] / 2**20
    on_host = next(model.parameters()).device.type == "cpu"
    return {"weights_mb": weights, "packed_mb": held_packed_bytes(model) / 2**20, "caches_mb": caches,
            "framework_mb": max(rss_mb - weights - caches, 0.0) if on_host else rss_mb}


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, text: str | torch.Tensor, *, max_length: int = 256,
             stride: int | None = None, max_tokens: int | None = None, prefill_tokens: int = 256,
             decode_tokens: int = 32, prompt_tokens: int = 16, repeats: int = 3,
             calibration_text: str | torch.Tensor | None = None, hit_tokens: int = 256,
             skip_speed: bool = False) -> dict:
    """Evaluate `model` on `text` (a string, or token ids when tokenizer is None); JSON-serialisable dict.

    perplexity: sliding window of max_length tokens every `stride` (default max_length), over the first
    max_tokens tokens (default all). prefill: one forward of prefill_tokens. decode: greedy generation of
    decode_tokens after prompt_tokens, use_cache=True. calibration_text: warm-up of cached layers first.
    hit_tokens: last tokens of the text, decoded one by one to count cache hits (cached models only).
    """
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = _ids(tokenizer, text)
    report: dict = {"model": describe(model), "footprint": routed_footprint(model)}
    report["warm_up"] = warm_up_caches(model, tokenizer, calibration_text, max_length) if calibration_text is not None \
        else None
    report["cache"] = decode_hit_rate(model, ids[-hit_tokens:], hit_tokens, max_length)
    report["perplexity"] = perplexity(model, ids, max_length, stride, max_tokens)
    if not skip_speed:
        report["speed"] = {**prefill_speed(model, ids[:prefill_tokens], repeats),
                           **decode_speed(model, ids[:prompt_tokens], decode_tokens, repeats)}
    report["memory"] = memory_stats(device)
    report["memory"]["breakdown"] = memory_breakdown(model, report["memory"]["rss_mb"])
    log.info("perplexity %.3f over %d tokens%s", report["perplexity"]["perplexity"], report["perplexity"]["tokens"],
             "" if report["cache"] is None else f", decode cache hit rate {report['cache']['hit_rate']:.3f}")
    return report
