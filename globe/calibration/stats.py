"""Activation statistics of a model's routed experts in memory (`ActivationStats`), as `globe calibrate` writes
them, and the check that they fit a model. The file (its tensors, shapes, version, reader and writer) is
globe.formats.stats, whose docstring lists every tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from globe.calibration.routed import RoutedSamples
from globe.errors import ArtifactError
from globe.formats.stats import read_stats_file, write_stats_file


@dataclass
class ActivationStats:
    """Second moments of the routed experts' inputs on calibration text (see the module docstring)."""

    layers: list[int]
    hidden: torch.Tensor                          # [L, d, d]
    tokens: int                                   # tokens per layer
    counts: torch.Tensor                          # [L, E] int64
    weight_sums: torch.Tensor                     # [L, E]
    hidden_expert: torch.Tensor | None = None     # [L, E, d, d]
    intermediate_expert: torch.Tensor | None = None   # [L, E, p, p]
    gate_channels: torch.Tensor | None = None     # [L, E, p]
    up_channels: torch.Tensor | None = None       # [L, E, p]
    info: dict[str, Any] = field(default_factory=dict)
    routed: RoutedSamples | None = None           # routed token samples (collect_stats(routed=...)); not in the file

    @property
    def per_expert(self) -> bool:
        return self.hidden_expert is not None and self.intermediate_expert is not None

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"layers": torch.tensor(self.layers, dtype=torch.int64), "hidden.sum": self.hidden.float(),
               "routed.counts": self.counts.long(), "routed.weight_sums": self.weight_sums.float()}
        if self.hidden_expert is not None:
            out["hidden.expert_sum"] = self.hidden_expert.float()
        if self.intermediate_expert is not None:
            out["intermediate.expert_sum"] = self.intermediate_expert.float()
        for name in ("gate", "up"):
            if getattr(self, f"{name}_channels") is not None:
                out[f"{name}.channel_sums"] = getattr(self, f"{name}_channels").float()
        return {k: v.contiguous() for k, v in out.items()}


def save_stats(stats: ActivationStats, path: str | Path) -> Path:
    """Write `stats` to one safetensors file atomically (globe.formats.stats); returns its path."""
    return write_stats_file(path, stats.tensors(), {**stats.info, "tokens": stats.tokens})


def load_stats(path: str | Path) -> ActivationStats:
    """Read a statistics file written by save_stats; ArtifactError naming the file and key if it is missing,
    corrupt, not stats, or holds values of the wrong dtype, shape or sign, or NaN/Inf (globe.formats.stats)."""
    tensors, info = read_stats_file(path)
    return ActivationStats(layers=tensors["layers"].tolist(), hidden=tensors["hidden.sum"],
                           tokens=int(info.get("tokens", 0)), counts=tensors["routed.counts"],
                           weight_sums=tensors["routed.weight_sums"], hidden_expert=tensors.get("hidden.expert_sum"),
                           intermediate_expert=tensors.get("intermediate.expert_sum"),
                           gate_channels=tensors.get("gate.channel_sums"), up_channels=tensors.get("up.channel_sums"),
                           info=info)


def check_stats_fit(stats: ActivationStats, inventory, path: str | Path) -> None:
    """ArtifactError unless the statistics were collected on a model shaped like `inventory`'s (a
    globe.io.Inventory): the same MoE layers, experts, hidden size d and expert size p."""
    def fail(what: str) -> None:
        raise ArtifactError(f"{path}: {what}; these statistics belong to another model, run `globe calibrate` "
                            f"on {inventory.model_dir}")
    if list(stats.layers) != list(inventory.moe_layers):
        fail(f"tensor layers is {list(stats.layers)} but the model's MoE layers are {inventory.moe_layers}")
    if stats.hidden.shape[-1] != inventory.d:
        fail(f"tensor hidden.sum is for hidden size {stats.hidden.shape[-1]}, the model's is {inventory.d}")
    if stats.counts.shape[-1] != inventory.num_experts:
        fail(f"tensor routed.counts counts {stats.counts.shape[-1]} experts, the model has {inventory.num_experts}")
    if stats.intermediate_expert is not None and stats.intermediate_expert.shape[-1] != inventory.p:
        fail(f"tensor intermediate.expert_sum is for expert size {stats.intermediate_expert.shape[-1]}, the "
             f"model's is {inventory.p}")
