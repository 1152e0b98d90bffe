"""Token perplexity of a causal LM on held-out text with a sliding window.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the tokens no earlier window
scored, with at least max_length - stride tokens of context when stride < max_length (with stride == max_length
the windows do not overlap and each window's first token, having no context, is not scored). The NLL is summed
in fp32 from the logits, not averaged per window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from globe.errors import ConfigError
from globe.progress import progress


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids [n] of `text` without special tokens (the fast backend is used directly when present)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return torch.tensor(backend.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def scored_windows(num_tokens: int, max_length: int = 256, stride: int | None = None):
    """(begin, end, n_new) of every window over `num_tokens` ids: the window ids[begin:end] scores its last n_new
    targets (each target exactly once over all windows). Shared by perplexity and globe.eval.divergence."""
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ConfigError(f"perplexity needs 0 < stride <= max_length (got stride {stride}, max_length {max_length})")
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        n_new = min(end - prev_end, end - begin - 1)                              # targets not scored yet
        if n_new > 0:                                 # (a last window of one token has nothing to predict)
            yield begin, end, n_new
        prev_end = end
        if end == num_tokens:
            return


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int = 256, stride: int | None = None,
               max_tokens: int | None = None) -> dict[str, float | int]:
    """{"perplexity", "nll" (mean per token), "tokens" scored, "windows", "max_length", "stride"} on ids [n]."""
    stride = max_length if stride is None else stride
    ids = input_ids.reshape(-1)[:max_tokens] if max_tokens else input_ids.reshape(-1)
    windows = list(scored_windows(ids.numel(), max_length, stride))          # checks stride before the ids
    if ids.numel() < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    for begin, end, n_new in progress(windows, "perplexity"):
        window = ids[begin:end].to(device)
        logits = model(input_ids=window[None], use_cache=False).logits[0, -n_new - 1:-1]   # [n_new, V]
        nll += float(F.cross_entropy(logits.float(), window[-n_new:], reduction="sum"))
        scored += n_new
    mean = nll / scored
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": scored, "windows": len(windows),
            "max_length": max_length, "stride": stride}
