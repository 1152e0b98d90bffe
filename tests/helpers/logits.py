"""Fixed token ids and the logits a model gives on them (no KV cache, no grad): for logits-equality tests."""
from __future__ import annotations

import torch


def fixed_ids(rows: int = 2, cols: int = 10, seed: int = 0) -> torch.Tensor:
    """Seeded ids [rows, cols] in 3..63 (inside every tiny test vocabulary, past the special tokens)."""
    return torch.randint(3, 64, (rows, cols), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fixed_logits(model) -> torch.Tensor:
    """model's logits [2, 10, V] on fixed_ids()."""
    return model(input_ids=fixed_ids(), use_cache=False).logits
