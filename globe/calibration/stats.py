"""Activation statistics of a model's routed experts, as `globe calibrate` writes them: one safetensors file.

Per MoE layer l (stacked along the first axis, in `layers` order), sums over the calibration tokens:
  hidden.sum             [L, d, d]     sum_t x_t x_t^T of every token entering the routed experts (their input)
  hidden.expert_sum      [L, E, d, d]  the same over the tokens routed to expert e        (optional: per_expert)
  intermediate.expert_sum [L, E, p, p] sum h h^T of the down projection's input h = act(W_g x) * (W_u x)
                                        over the tokens routed to expert e                  (optional: per_expert)
  gate.channel_sums      [L, E, p]     ||D_:,j||^2 sum_t (act'(g_j) u_j)^2: first-order output weight of gate row j
  up.channel_sums        [L, E, p]     ||D_:,j||^2 sum_t act(g_j)^2: the same for up row j    (optional: per_expert)
  routed.counts          [L, E]        tokens routed to each expert
  routed.weight_sums     [L, E]        sum of the routing weights of those tokens
  layers                 [L]           MoE layer indices
The header metadata holds `format_version`, `kind` and `info` (JSON: tokens, model, text, window, ...).
Sums are accumulated in fp64 and stored in fp32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from globe.core.files import atomic_write
from globe.errors import ArtifactError

STATS_FORMAT_VERSION = 1
STATS_KIND = "globe-activation-stats"


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
    """Write `stats` to one safetensors file atomically; returns its path."""
    path = Path(path)
    meta = {"format_version": str(STATS_FORMAT_VERSION), "kind": STATS_KIND,
            "info": json.dumps({**stats.info, "tokens": stats.tokens}, default=str)}
    tensors = stats.tensors()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_stats(path: str | Path) -> ActivationStats:
    """Read a statistics file written by save_stats; ArtifactError if it is missing, corrupt or not stats."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"activation statistics {path} not found: run `globe calibrate MODEL_DIR -o {path}` first")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt or not a safetensors file ({exc}): re-run `globe calibrate`") from None
    if meta.get("kind") != STATS_KIND:
        raise ArtifactError(f"{path} is not a GloBE activation statistics file (written by `globe calibrate`)")
    version = int(meta.get("format_version", -1))
    if not 1 <= version <= STATS_FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version}; this globe reads 1..{STATS_FORMAT_VERSION}")
    missing = [k for k in ("layers", "hidden.sum", "routed.counts", "routed.weight_sums") if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks tensor(s) {', '.join(missing)}: re-run `globe calibrate`")
    info = json.loads(meta.get("info", "{}"))
    return ActivationStats(layers=tensors["layers"].tolist(), hidden=tensors["hidden.sum"],
                           tokens=int(info.get("tokens", 0)), counts=tensors["routed.counts"],
                           weight_sums=tensors["routed.weight_sums"], hidden_expert=tensors.get("hidden.expert_sum"),
                           intermediate_expert=tensors.get("intermediate.expert_sum"),
                           gate_channels=tensors.get("gate.channel_sums"), up_channels=tensors.get("up.channel_sums"),
                           info=info)
