"""The activation-statistics format: one safetensors file as `globe calibrate` writes it.

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
Files of format_version 1..STATS_FORMAT_VERSION are read; anything else is an ArtifactError naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from globe.errors import ArtifactError
from globe.formats.tagged import open_tagged, write_tagged

STATS_FORMAT_VERSION = 1
STATS_KIND = "globe-activation-stats"
REQUIRED = ("layers", "hidden.sum", "routed.counts", "routed.weight_sums")


def write_stats_file(path: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write the statistics tensors and their `info` (JSON: tokens, model, text, window, ...) atomically."""
    return write_tagged(path, tensors, STATS_KIND, STATS_FORMAT_VERSION, info)


def read_stats_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a statistics file written by write_stats_file; ArtifactError naming the file and key if
    it is missing, corrupt, not stats, or holds values of the wrong dtype, shape or sign, or NaN/Inf."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"activation statistics {path} not found: run `globe calibrate MODEL_DIR -o {path}` first")
    tensors, meta = open_tagged(path, ": re-run `globe calibrate`")
    if meta.get("kind") != STATS_KIND:
        raise ArtifactError(f"{path} is not a GloBE activation statistics file (written by `globe calibrate`)")
    version = meta.get("format_version", "")
    if not version.isdigit() or not 1 <= int(version) <= STATS_FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this globe reads 1..{STATS_FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks tensor(s) {', '.join(missing)}: re-run `globe calibrate`")
    try:
        info = json.loads(meta.get("info", "{}"))
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("tokens", 0), int):
        raise ArtifactError(f"{path}: header metadata 'info' is not a JSON object with integer tokens: "
                            f"re-run `globe calibrate`")
    check_stats_tensors(tensors, path)
    return tensors, info


def check_stats_tensors(t: dict[str, torch.Tensor], path: Path) -> None:
    """Dtypes, shapes (consistent with each other), signs and finiteness of the stored statistics."""
    def fail(key: str, what: str) -> None:
        raise ArtifactError(f"{path}: tensor {key} {what}; re-run `globe calibrate`")
    for key, value in t.items():
        if key in ("layers", "routed.counts"):
            if value.dtype not in (torch.int32, torch.int64):
                fail(key, f"is {str(value.dtype).removeprefix('torch.')}, expected an integer dtype")
        elif not value.dtype.is_floating_point:
            fail(key, f"is {str(value.dtype).removeprefix('torch.')}, expected a float dtype")
        elif not bool(torch.isfinite(value).all()):
            fail(key, "holds NaN/Inf values")
        if key != "layers" and bool((value < 0).any()) and key not in ("hidden.sum", "hidden.expert_sum",
                                                                         "intermediate.expert_sum"):
            fail(key, "holds negative values")
    layers, hidden, counts = t["layers"], t["hidden.sum"], t["routed.counts"]
    if layers.dim() != 1 or bool((layers < 0).any()) or len(set(layers.tolist())) != layers.numel():
        fail("layers", f"must list distinct MoE layer indices (got {layers.tolist()})")
    n, e = layers.numel(), counts.shape[-1] if counts.dim() == 2 else -1
    d = hidden.shape[-1] if hidden.dim() == 3 else -1
    p = t["intermediate.expert_sum"].shape[-1] if "intermediate.expert_sum" in t else None
    expect = {"hidden.sum": (n, d, d), "routed.counts": (n, e), "routed.weight_sums": (n, e),
              "hidden.expert_sum": (n, e, d, d), "intermediate.expert_sum": (n, e, p, p),
              "gate.channel_sums": (n, e, p), "up.channel_sums": (n, e, p)}
    for key, shape in expect.items():
        if key in t and (tuple(t[key].shape) != shape or -1 in shape):
            fail(key, f"has shape {list(t[key].shape)}, expected {list(shape)} (layers x experts x sizes)")
