"""Throughput and memory: prefill tokens/s, greedy decode tokens/s with the KV cache, RSS / CUDA peak memory.

Decode speed is (N - 1) / (t(N new tokens) - t(1 new token)) on the same prompt, so the prefill and the first
token cancel out. Timings are medians over `repeats` runs after one warm-up run.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from globe.device import peak_memory_mb


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in seconds over `repeats` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_speed(model: nn.Module, prompt: torch.Tensor, repeats: int = 3) -> dict[str, float | int]:
    """Tokens/s of one forward pass over `prompt` ids [n] (batch 1, no KV cache kept)."""
    device = _device(model)
    ids = prompt.reshape(1, -1).to(device)
    seconds = _timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)
    return {"prefill_tokens": ids.shape[1], "prefill_seconds": seconds, "prefill_tok_s": ids.shape[1] / seconds}


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32,
                 repeats: int = 3) -> dict[str, float | int]:
    """Greedy decode tokens/s with use_cache: `new_tokens` generated after `prompt` ids [n] (batch 1) or [B, n]
    (batch B, one sequence per row); tokens/s counts every sequence's tokens (B x steps / seconds)."""
    device = _device(model)
    ids = (prompt if prompt.dim() == 2 else prompt.reshape(1, -1)).to(device)      # [B, n]
    new_tokens = max(new_tokens, 2)
    long = _timed(lambda: _generate(model, ids, new_tokens), device, repeats)
    short = _timed(lambda: _generate(model, ids, 1), device, repeats)
    steps, seconds, timing = new_tokens - 1, long - short, "difference"
    if seconds <= 0:                     # noise beat the steps' time (few tokens): time the whole generate instead,
        steps, seconds, timing = new_tokens, long, "whole-generate"      # a lower bound on the decode speed
    return {"decode_new_tokens": new_tokens, "decode_batch": ids.shape[0], "decode_seconds": seconds,
            "decode_tok_s": ids.shape[0] * steps / seconds, "decode_timing": timing, "generate_seconds": long}


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process over its lifetime, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """RSS now and peak (MiB); CUDA peak allocated since the last reset, or MPS allocated now (MiB)."""
    now = rss_mb()
    return {"rss_mb": now, "peak_rss_mb": max(now, peak_rss_mb()),
            "cuda_peak_mb": peak_memory_mb(device) if device.type == "cuda" else None,
            "mps_mb": peak_memory_mb(device) if device.type == "mps" else None}
