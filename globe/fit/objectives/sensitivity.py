"""Per-layer weights of the fit's objectives from the sensitivity probe (globe.calibration.sensitivity).

The probe measured KL_lf: the model's KL per token with layer l's family-f experts perturbed by a fixed,
deterministic perturbation D (`perturbation`). Here each objective measures its OWN error of the same D, so that

    c_lf = KL_lf / error_lf        (the KL per unit of what this objective minimises, in layer l)

and weights its experts' terms by c, normalised to mean 1 over the experts: the shared bank then spends its
capacity where the model feels it. Per-expert scalars leave each expert's adapters and codes unchanged (their
refit is per expert); only the shared bank's trade-off between layers moves.

    layer_gains(stats, family, weights, ids, whiten)   activation objective: g_i^2 *= c_l(i)f (per family)
    output_gains(stats, weights, ids, data, loss)       whole-expert objective: each layer's term *= c_l
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from globe.calibration.sensitivity import layer_factor, perturbation
from globe.calibration.stats import ActivationStats
from globe.errors import ConfigError

log = logging.getLogger(__name__)


def probe_of(stats: ActivationStats | None) -> dict | None:
    """The probe's record the statistics carry (None: none)."""
    probe = (stats.info or {}).get("sensitivity") if stats is not None else None
    return probe if isinstance(probe, dict) and probe.get("kl") else None


def _kl(probe: dict, family: str, layers: list[int]) -> torch.Tensor:
    """The probe's KL [L] of `family` in the order of `layers`."""
    where = {int(l): i for i, l in enumerate(probe["layers"])}
    missing = [l for l in layers if l not in where]
    if missing or family not in probe["kl"]:
        raise ConfigError(f"the sensitivity probe of the calibration statistics lacks {family} of layer(s) "
                          f"{missing}: calibrate the model being fitted")
    return torch.tensor([float(probe["kl"][family][where[l]]) for l in layers], dtype=torch.float64)


def _perturbations(stats: ActivationStats, probe: dict, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The probe's perturbation D [N, p, d] of every expert (weights [N, p, d] in the order of ids [N, 2])."""
    out = torch.empty(weights.shape, dtype=torch.float32)
    for layer in sorted({int(l) for l in ids[:, 0].tolist()}):
        rows = ids[:, 0] == layer
        out[rows] = perturbation(weights[rows].float(), layer_factor(stats, layer), probe["keep"], probe["error"])
    return out


def _normalised(c_layer: torch.Tensor, position: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Per-expert weights [N] from per-layer c [L] (to the given power), mean 1 over the experts."""
    per_expert = (c_layer / c_layer.max().clamp_min(1e-300))[position] ** power
    return per_expert / per_expert.mean().clamp_min(1e-300)


def _positions(ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    layers = sorted({int(l) for l in ids[:, 0].tolist()})
    return layers, torch.searchsorted(torch.tensor(layers), ids[:, 0].long().contiguous())


def layer_gains(stats: ActivationStats, family: str, weights: torch.Tensor, ids: torch.Tensor,
                error: Callable[[torch.Tensor], torch.Tensor], power: float = 1.0) -> tuple[torch.Tensor, dict]:
    """(w [N] per-expert weights of the activation objective, mean 1; its record). error(D) [N]: the objective's
    per-expert error of D (in its normalised space, gains 1)."""
    probe = probe_of(stats)
    layers, position = _positions(ids)
    per_expert = error(_perturbations(stats, probe, weights, ids)).double()          # [N]
    err = torch.zeros(len(layers), dtype=torch.float64).index_add_(0, position, per_expert)
    c = _kl(probe, family, layers) / err.clamp_min(1e-300)
    w = _normalised(c, position, power)
    record = {"layers": layers, "kl": _kl(probe, family, layers).tolist(), "objective_error": err.tolist(),
              "c": c.tolist(), "weights": [float(w[position == i][0]) for i in range(len(layers))]}
    log.info("%s: sensitivity weights per layer %s", family, [f"{v:.2f}" for v in record["weights"]])
    return w.float(), record


def output_gains(stats: ActivationStats, weights: dict[str, torch.Tensor], ids: torch.Tensor,
                 loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], power: float = 1.0
                 ) -> tuple[torch.Tensor, dict]:
    """(w [N] per-expert weights of the whole-expert objective, mean 1; its record). weights: original gate / up
    [N, p, d]; loss({family: D}) [N]: the objective's per-expert error with those families perturbed by D. Per
    layer, c_l = (KL_l,gate + KL_l,up) / (error_l,gate + error_l,up)."""
    probe = probe_of(stats)
    layers, position = _positions(ids)
    kl = torch.zeros(len(layers), dtype=torch.float64)
    err = torch.zeros(len(layers), dtype=torch.float64)
    for family in ("gate", "up"):
        per_expert = loss({family: _perturbations(stats, probe, weights[family], ids)}).double()
        err.index_add_(0, position, per_expert)
        kl += _kl(probe, family, layers)
    c = kl / err.clamp_min(1e-300)
    w = _normalised(c, position, power)
    record = {"layers": layers, "kl": kl.tolist(), "objective_error": err.tolist(), "c": c.tolist(),
              "weights": [float(w[position == i][0]) for i in range(len(layers))]}
    log.info("whole-expert objective: sensitivity weights per layer %s", [f"{v:.2f}" for v in record["weights"]])
    return w.float(), record
