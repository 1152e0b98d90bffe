"""Behaviour metrics of a compressed model against its original: KL(original || compressed) per token and top-1
agreement, next to both perplexities, on the same token windows.

    div = divergence(original, compressed, ids, max_length=256)
    div["kl"], div["top1"], div["tokens"]       # mean nats per scored token, argmax agreement, tokens scored

Both models see exactly the windows globe.eval.perplexity scores (every target once, with the same context), so
`perplexity` and `reference_perplexity` here equal what perplexity() reports for each model. Logits are streamed
window by window (never all held) and turned into log-probabilities in fp32:
    KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),   p = softmax(original logits), q = softmax(compressed logits)
top-1 agreement = the fraction of scored positions where argmax p == argmax q.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from globe.errors import ConfigError
from globe.eval.perplexity import scored_windows
from globe.progress import progress


def _log_probs(model: nn.Module, window: torch.Tensor, n_new: int) -> torch.Tensor:
    """fp32 log-softmax of the logits that predict the window's last n_new tokens: [n_new, V]."""
    device = next(model.parameters()).device
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, -n_new - 1:-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def divergence(reference: nn.Module, candidate: nn.Module, input_ids: torch.Tensor, max_length: int = 256,
               stride: int | None = None, max_tokens: int | None = None) -> dict[str, float | int]:
    """{"kl" (nats per token, mean), "kl_max" (largest per-token KL), "top1" (agreement), "tokens", "windows",
    "perplexity" (candidate), "reference_perplexity", "max_length", "stride"} on ids [n] (the first max_tokens)."""
    stride = max_length if stride is None else stride
    ids = input_ids.reshape(-1)[:max_tokens] if max_tokens else input_ids.reshape(-1)
    windows = list(scored_windows(ids.numel(), max_length, stride))
    if ids.numel() < 2:
        raise ConfigError(f"KL and top-1 agreement need at least 2 tokens of text, got {ids.numel()}")
    for model in (reference, candidate):
        model.eval()
    kl, kl_max, agree, nll_p, nll_q, scored = 0.0, 0.0, 0, 0.0, 0.0, 0
    for begin, end, n_new in progress(windows, "KL to the original"):
        window = ids[begin:end]
        log_p = _log_probs(reference, window, n_new)                              # [n_new, V]
        log_q = _log_probs(candidate, window, n_new)                              # [n_new, V]
        if log_p.shape != log_q.shape:
            raise ConfigError(f"the original predicts {log_p.shape[-1]} tokens and the compressed model "
                              f"{log_q.shape[-1]}: KL needs the same vocabulary")
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)          # [n_new]
        kl += float(per_token.sum())
        kl_max = max(kl_max, float(per_token.max()))
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        targets = window[-n_new:, None]
        nll_p -= float(log_p.gather(-1, targets).sum())
        nll_q -= float(log_q.gather(-1, targets).sum())
        scored += n_new
    return {"kl": kl / scored, "kl_max": kl_max, "top1": agree / scored, "tokens": scored, "windows": len(windows),
            "perplexity": math.exp(nll_q / scored), "reference_perplexity": math.exp(nll_p / scored),
            "max_length": max_length, "stride": stride}
