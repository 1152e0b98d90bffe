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


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int = 256, stride: int | None = None,
               max_tokens: int | None = None) -> dict[str, float | int]:
    """{"perplexity", "nll" (mean per token), "tokens" scored, "windows", "max_length", "stride"} on ids [n]."""
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ConfigError(f"perplexity needs 0 < stride <= max_length (got stride {stride}, max_length {max_length})")
    ids = input_ids.reshape(-1)[:max_tokens] if max_tokens else input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    device = next(model.parameters()).device
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in progress(range(0, ids.numel(), stride), "perplexity"):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].to(device)
        n_new = min(end - prev_end, window.numel() - 1)                              # targets not scored yet
        logits = model(input_ids=window[None], use_cache=False).logits[0, -n_new - 1:-1]   # [n_new, V]
        targets = window[-n_new:]
        nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        scored, windows, prev_end = scored + n_new, windows + 1, end
        if end == ids.numel():
            break
    mean = nll / scored
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": scored, "windows": windows,
            "max_length": max_length, "stride": stride}
