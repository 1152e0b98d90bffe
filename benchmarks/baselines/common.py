"""What every peer baseline returns, and the small helpers they share."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PeerFit:
    """One family's reconstruction by a baseline.

    weights: [L, E, p, d] float32 reconstructed expert matrices; params: stored parameters of the whole family
    (every factor, base, code and logit the method has to keep); info: the method's shape (ranks, m, ...).
    """

    weights: torch.Tensor
    params: int
    info: dict[str, Any] = field(default_factory=dict)


def rel_err(target: torch.Tensor, approx: torch.Tensor) -> float:
    """||target - approx||_F / ||target||_F over all experts, accumulated in float64."""
    num = den = 0.0
    for t, a in zip(target.reshape(-1, *target.shape[-2:]), approx.reshape(-1, *approx.shape[-2:])):
        num += float((t.double() - a.double()).square().sum())
        den += float(t.double().square().sum())
    return math.sqrt(num / den)


def check_shape(weights: torch.Tensor) -> tuple[int, int, int, int]:
    """(L, E, p, d) of a [L, E, p, d] family tensor; ValueError otherwise."""
    if weights.dim() != 4:
        raise ValueError(f"expected expert weights [L, E, p, d], got shape {tuple(weights.shape)}")
    return tuple(weights.shape)


def lowrank(w: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of every matrix of a [..., p, d] batch (SVD in float64)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[..., :, :r] * s[..., None, :r]) @ vh[..., :r, :]).float()


def by_layer(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N, p, d] experts with ids [N, 2] = (layer, expert) -> [L, E, p, d] float32 (every layer with E experts)."""
    order = torch.argsort(ids[:, 0] * (int(ids[:, 1].max()) + 1) + ids[:, 1])
    layers = int(ids[:, 0].unique().numel())
    return weights[order].float().reshape(layers, -1, *weights.shape[1:])
