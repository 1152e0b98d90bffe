"""The original model's next-token distribution on calibration tokens, computed once and kept compact, and the KL
of a model's logits to it.

Per position the teacher keeps its top_k log-probabilities and their token ids, and the log of the mass left
outside them (the tail). The loss is the KL between the two distributions coarsened to those k tokens plus one
tail bucket,
    KL_t = sum_{v in topk} p(v) (log p(v) - log q(v)) + P_tail (log P_tail - log Q_tail),
a lower bound of the full KL that equals it when top_k covers the vocabulary (top_k = 0 keeps every token).
Memory: positions x top_k x (4 + 4) bytes, instead of positions x vocabulary x 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from globe.progress import progress

TINY = 1e-12


@dataclass
class Targets:
    """Teacher log-probs of sequences [S, T]: log_probs [S, T, k], tokens [S, T, k] (None: all), tail [S, T]."""

    log_probs: torch.Tensor
    tokens: torch.Tensor | None
    tail: torch.Tensor | None

    def rows(self, index: torch.Tensor) -> Targets:
        pick = (lambda t: None if t is None else t[index])
        return Targets(self.log_probs[index], pick(self.tokens), pick(self.tail))


def _log1m_exp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped away from log 0."""
    return torch.log((-torch.expm1(log_mass.clamp_max(-TINY))).clamp_min(TINY))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float()               # [b, T, V]


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor, top_k: int, batch: int) -> Targets:
    """Targets of `model` on sequences ids [S, T], `batch` sequences per forward, kept on the CPU."""
    parts: list[tuple] = []
    for first in progress(range(0, ids.shape[0], batch), "distill: original logits"):
        log_p = F.log_softmax(logits_of(model, ids[first:first + batch]), dim=-1)      # [b, T, V]
        if top_k and top_k < log_p.shape[-1]:
            values, tokens = log_p.topk(top_k, dim=-1)                                  # [b, T, k]
            parts.append((values.cpu(), tokens.to(torch.int32).cpu(),
                          _log1m_exp(torch.logsumexp(values, dim=-1)).cpu()))
        else:
            parts.append((log_p.cpu(), None, None))
    cat = (lambda i: None if parts[0][i] is None else torch.cat([p[i] for p in parts]))
    return Targets(cat(0), cat(1), cat(2))


def kl_loss(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Mean per-position KL(teacher || softmax(logits)) of logits [b, T, V] against targets of the same rows."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = targets.log_probs.to(log_q.device)
    if targets.tokens is None:
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    log_q_top = log_q.gather(-1, targets.tokens.to(log_q.device).long())                  # [b, T, k]
    tail_p = targets.tail.to(log_q.device)
    tail_q = _log1m_exp(torch.logsumexp(log_q_top, dim=-1))
    top = (log_p.exp() * (log_p - log_q_top)).sum(-1)
    return (top + tail_p.exp() * (tail_p - tail_q)).mean()
