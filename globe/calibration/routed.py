"""A capped sample of the tokens routed to each expert during calibration (for the whole-expert refinement,
globe.fit.engine.expert), in memory (`RoutedSamples`) and its collector (`RoutedCollector`, fed by
globe.calibration.collect). The file format is globe.formats.routed.

Each expert keeps the first `cap` tokens routed to it (its MoE-layer input x and the routing weight), never more:
the memory is bounded by layers x experts x cap x d floats, and `cap_for` lowers cap to fit a byte limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from globe.formats.routed import read_routed_file, write_routed_file


@dataclass
class RoutedSamples:
    """inputs [L, E, S, d] fp32 (zero-padded), weights [L, E, S], counts [L, E], layers, info (activation, ...)."""

    layers: list[int]
    inputs: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)


def cap_for(cap: int, layers: int, experts: int, d: int, max_mb: int) -> int:
    """Samples per expert: cap, lowered so that layers x experts x cap x (d + 1) fp32 fit in max_mb MiB (>= 2)."""
    per_sample = layers * experts * (d + 1) * 4
    return max(2, min(cap, (max_mb << 20) // max(per_sample, 1)))


class RoutedCollector:
    """Keeps the first `cap` routed tokens per (layer, expert)."""

    def __init__(self, layers: list[int], experts: int, d: int, cap: int, activation: str) -> None:
        self.layers, self.cap, self.activation = list(layers), cap, activation
        self.inputs = torch.zeros(len(layers), experts, cap, d)
        self.weights = torch.zeros(len(layers), experts, cap)
        self.counts = torch.zeros(len(layers), experts, dtype=torch.int64)

    def add(self, layer: int, expert: int, x: torch.Tensor, weights: torch.Tensor) -> None:
        """x [n, d], weights [n]: the tokens just routed to this expert (the first ones fill its free slots)."""
        li = self.layers.index(layer)
        have = int(self.counts[li, expert])
        take = min(self.cap - have, x.shape[0])
        if take <= 0:
            return
        self.inputs[li, expert, have:have + take] = x[:take].float()
        self.weights[li, expert, have:have + take] = weights[:take].float()
        self.counts[li, expert] += take

    def samples(self) -> RoutedSamples:
        return RoutedSamples(self.layers, self.inputs, self.weights, self.counts,
                             {"activation": self.activation, "cap": self.cap})


def save_routed(samples: RoutedSamples, path: str | Path) -> Path:
    tensors = {"inputs": samples.inputs, "weights": samples.weights, "counts": samples.counts,
               "layers": torch.tensor(samples.layers, dtype=torch.int64)}
    return write_routed_file(path, tensors, samples.info)


def load_routed(path: str | Path) -> RoutedSamples:
    tensors, info = read_routed_file(path)
    return RoutedSamples(tensors["layers"].tolist(), tensors["inputs"].float(), tensors["weights"].float(),
                         tensors["counts"].long(), info)
