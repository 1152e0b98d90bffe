"""Calibration text the model writes itself: seeded multinomial sampling, batched, with a KV cache. Data-free: no
text, no network, only the model.

    ids = self_generated_ids(model, SelfText(tokens=32768, seed=0))     # [sequences, length] token ids

Every sequence starts with the model's BOS token (when its config has one) followed by `random_prefix` tokens
drawn uniformly from the vocabulary (at least one when there is no BOS), then continues with tokens sampled from
the model's own next-token distribution at `temperature` (1: the distribution itself). One torch.Generator on the
model's device, seeded with `seed`, draws everything: the same model, seed and device give the same tokens.
On the CPU the decode steps run on one thread: each step is a few small matmuls, latency-bound, and with several
threads every step waits for the slowest of them (measured on a busy 2-core machine: 0.16 s per step of 32 rows on
one thread, 4.2 s on two).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from globe.device import one_cpu_thread
from globe.errors import ConfigError
from globe.progress import progress

log = logging.getLogger(__name__)


@dataclass
class SelfText:
    """How much text to sample and how: total tokens, sequence length, sequences per batch, seed, temperature."""

    tokens: int = 32768            # total tokens (rounded up to whole sequences)
    length: int = 256              # tokens per sequence, prefix included (capped by max_position_embeddings)
    batch: int = 64                # sequences sampled together (one forward per token for all of them)
    seed: int = 0
    temperature: float = 1.0
    random_prefix: int = 0         # uniformly random tokens after BOS (at least 1 when the model has no BOS)

    def check(self) -> "SelfText":
        if self.tokens < 2 or self.length < 2 or self.batch < 1 or self.random_prefix < 0:
            raise ConfigError(f"self-generated calibration needs --calibration-tokens >= 2, sequences of >= 2 tokens "
                              f"and a batch >= 1 (got tokens {self.tokens}, length {self.length}, batch {self.batch}, "
                              f"random prefix {self.random_prefix})")
        if not self.temperature > 0:
            raise ConfigError(f"self-generated calibration needs a temperature > 0 (got {self.temperature})")
        return self

    def describe(self) -> dict:
        return {"source": "self-generated", **asdict(self)}


def start_tokens(model: nn.Module, spec: SelfText) -> str:
    """How every sequence starts, in words (for the model card)."""
    bos = getattr(model.config, "bos_token_id", None)
    count = spec.random_prefix if bos is not None else max(spec.random_prefix, 1)
    parts = ([f"its BOS token ({bos})"] if bos is not None else []) + \
        ([f"{count} uniformly random token{'s' if count > 1 else ''}"] if count else [])
    return " and ".join(parts)


def _prefix(model: nn.Module, rows: int, spec: SelfText, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, k] start tokens: BOS (if any) then random_prefix uniform tokens (at least one without BOS)."""
    device = gen.device
    bos = getattr(model.config, "bos_token_id", None)
    random_count = spec.random_prefix if bos is not None else max(spec.random_prefix, 1)
    parts = [] if bos is None else [torch.full((rows, 1), int(bos), dtype=torch.long, device=device)]
    if random_count:
        parts.append(torch.randint(0, vocab, (rows, random_count), generator=gen, device=device))
    return torch.cat(parts, dim=1)


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), fp32: [rows, 1]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)


def _step(model: nn.Module, ids: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
    """(last-position logits [rows, V], the updated KV cache) of one forward of ids [rows, k] after `cache`.
    transformers 5 names the cache `cache`; earlier versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=ids, use_cache=True, **({name: cache} if cache is not None else {}), **extra)
    return out.logits[:, -1], (out.cache if name == "cache" else out.past_key_values)


@torch.no_grad()
def _sequences(model: nn.Module, start: torch.Tensor, length: int, temperature: float,
               gen: torch.Generator) -> torch.Tensor:
    """Continue `start` [rows, k] to [rows, length] by sampling, one step at a time with the KV cache."""
    tokens = [start]
    logits, cache = _step(model, start, None)
    for position in range(start.shape[1], length):
        token = _sample(logits, temperature, gen)                                  # [rows, 1]
        tokens.append(token)
        if position + 1 < length:
            logits, cache = _step(model, token, cache)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def self_generated_ids(model: nn.Module, spec: SelfText | None = None) -> torch.Tensor:
    """[sequences, length] token ids sampled from `model` (see the module docstring); on the CPU."""
    spec = (spec or SelfText()).check()
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or spec.length
    length = min(spec.length, int(limit))
    vocab = int(model.get_output_embeddings().weight.shape[0])
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    rows = math.ceil(spec.tokens / length)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with one_cpu_thread(device):
            for first in progress(range(0, rows, spec.batch), "self-generated text"):
                start = _prefix(model, min(spec.batch, rows - first), spec, vocab, gen)
                if start.shape[1] >= length:
                    raise ConfigError(f"the prefix ({start.shape[1]} tokens) leaves no room to sample in sequences "
                                      f"of {length} tokens")
                chunks.append(_sequences(model, start, length, spec.temperature, gen).cpu())
    finally:
        model.train(was_training)
    ids = torch.cat(chunks)
    log.info("sampled %d calibration tokens from the model (%d sequences of %d, seed %d, temperature %g)",
             ids.numel(), ids.shape[0], length, spec.seed, spec.temperature)
    return ids
