"""Duplicated experts: the same weights twice in one family (upcycled or merged MoEs have them). They are found by
their sum and squared norm, confirmed bit for bit, and every copy gets the codes and adapters
of its first occurrence, so that copies reconstruct identically (the model card lists them:
globe.export.card.unusual_experts). Dead (all-zero) experts are left alone: they are exact already.

    copies = duplicate_experts(weights)              # {copy index: first index}
    tie_duplicates(copies, adapters, codes, sq_err)  # in place
    tie_quantized(copies, packed_adapters)           # a copy of a QuantizedTensor [N, ...] with the rows tied
"""
from __future__ import annotations

import logging

import torch

from globe.quant.tensor import QuantizedTensor, pack

log = logging.getLogger(__name__)


def fingerprints(weights: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[N, 2] fp64 (sum, sum of squares) of each expert of weights [N, p, d], chunk by chunk."""
    out = torch.empty(weights.shape[0], 2, dtype=torch.float64)
    for lo in range(0, weights.shape[0], chunk):
        w = weights[lo:lo + chunk].to(torch.float64).flatten(1)                      # [c, p * d]
        out[lo:lo + w.shape[0]] = torch.stack([w.sum(1), w.square().sum(1)], 1)
    return out


def duplicate_experts(weights: torch.Tensor, names: list[str] | None = None, chunk: int = 64,
                      prints: torch.Tensor | None = None) -> dict[int, int]:
    """{index of a copy: index of the first expert with the same weights} for weights [N, p, d] (as stored: the
    objective's own spaces may weight copies differently). `prints` [N, 2] (squared norm first; 0 = dead): per-expert
    statistics already computed (e.g. the normaliser's), so that only candidate pairs are read again."""
    prints = fingerprints(weights, chunk)[:, [1, 0]] if prints is None else prints
    first: dict[tuple[float, float], list[int]] = {}
    copies: dict[int, int] = {}
    for i in range(weights.shape[0]):
        key = (float(prints[i, 0]), float(prints[i, 1]))
        if key[0] == 0.0:                                           # dead: exact zero factors already
            continue
        same = next((j for j in first.get(key, []) if torch.equal(weights[i:i + 1], weights[j:j + 1])), None)
        if same is None:
            first.setdefault(key, []).append(i)
        else:
            copies[i] = same
    if copies:
        label = (lambda i: names[i]) if names else (lambda i: f"expert {i}")
        shown = ", ".join(f"{label(c)} = {label(f)}" for c, f in list(copies.items())[:3])
        log.info("%d duplicated expert(s) (%s%s): each copy gets the factors of its first occurrence", len(copies),
                 shown, " ..." if len(copies) > 3 else "")
    return copies


def tie_duplicates(copies: dict[int, int], *tensors: torch.Tensor) -> None:
    """Copy row `first` into row `copy` of each tensor ([N, ...]: adapters, codes, squared errors), in place."""
    if not copies:
        return
    dst, src = torch.tensor(list(copies)), torch.tensor(list(copies.values()))
    for tensor in tensors:
        tensor[dst.to(tensor.device)] = tensor[src.to(tensor.device)].clone()


def tie_quantized(copies: dict[int, int], tensor: QuantizedTensor) -> QuantizedTensor:
    """`tensor` ([N, ...], e.g. packed adapters) with row `first` copied into row `copy`: codes, scales and zeros."""
    if not copies:
        return tensor
    codes, scales, zeros = tensor.integer_codes().clone(), tensor.scales.clone(), tensor.zeros.clone()
    tie_duplicates(copies, codes, scales, zeros)
    return pack(codes, scales, zeros, tensor.bits, tensor.group)
