"""Sensitivity probe: how much the model's next-token distribution feels an error in each MoE layer's gate / up.

    probe = layer_sensitivity(model, ids, stats)      # model: the original, loaded; ids: calibration tokens [S, T]

Before the fit, on the calibration tokens: one layer and one family at a time, every expert's weights W_i are
replaced by W_i + D_i, a fixed, data-aware perturbation shaped like a low-rank fit's error (`perturbation`: the
tail of W_i L_i past the leading `keep` share of its singular directions, L_i the Cholesky factor of the expert's
input second moment blended with its layer's as the fit's default, scaled so that ||D_i L_i|| = `error`
||W_i L_i||), and the KL(original || perturbed) per token of the model's next-token distribution is measured. The
fit (globe.fit.objectives.sensitivity) divides each KL by its own objective's error of the same perturbation:
c_lf = KL / error, the KL per unit of what the fit minimises, which weights the shared bank's objective towards
the layers the model feels. Cost: one forward pass of the probe's tokens per (layer, family) plus one for the
reference (in fp32).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globe.calibration.stats import ActivationStats
from globe.errors import ConfigError
from globe.io.model import experts_modules, model_arch
from globe.progress import progress

log = logging.getLogger(__name__)

SENSITIVITY_FORMAT_VERSION = 1
FAMILIES = ("gate", "up")
PROBE_KEEP = 0.5          # share of each expert's whitened singular directions the perturbation leaves alone
PROBE_ERROR = 0.2         # relative whitened error of every expert's perturbation
PROBE_TOKENS = 4096       # calibration tokens the KL is measured on (the first whole sequences) ...
PROBE_LOGIT_BYTES = 1 << 30   # ... fewer where the reference log-probs (tokens x vocabulary fp32) would pass this
PROBE_DAMP = 0.01         # ridge on C scaled to mean eigenvalue 1 (the fit's default damp)
PROBE_PRIOR = 64.0        # tokens of the layer's C blended into each expert's (the fit's default prior_tokens)


def layer_factor(stats: ActivationStats, layer: int, damp: float = PROBE_DAMP,
                 prior_tokens: float = PROBE_PRIOR) -> torch.Tensor:
    """Cholesky factors [E, d, d] (fp64) of each expert's gate/up input second moment, blended with the layer's as
    the fit's default does ((S_e + prior C_l) / (n_e + prior)), each scaled to mean eigenvalue 1 (layer-level
    statistics only: the layer's C for every expert)."""
    pos = stats.layer_index(layer)
    layer_c = stats.hidden[pos].double() / max(stats.tokens, 1)                     # [d, d]
    if stats.hidden_expert is None:
        c = layer_c[None].expand(stats.counts.shape[1], -1, -1)
    else:
        counts = stats.counts[pos].double()[:, None, None]
        c = (stats.hidden_expert[pos].double() + prior_tokens * layer_c) / (counts + prior_tokens)
    c = 0.5 * (c + c.transpose(1, 2))
    scale = c.diagonal(dim1=1, dim2=2).mean(1)[:, None, None]
    if not bool((scale > 0).all()):
        raise ConfigError(f"calibration statistics of layer {layer} are empty: calibrate on more text")
    return torch.linalg.cholesky(c / scale + damp * torch.eye(c.shape[-1], dtype=c.dtype))


def perturbation(weights: torch.Tensor, factor: torch.Tensor, keep: float = PROBE_KEEP,
                 error: float = PROBE_ERROR) -> torch.Tensor:
    """D [E, p, d] fp32 for weights [E, p, d] and factors L [E, d, d] (or one [d, d]): minus the tail of W_i L_i past
    its leading ceil(keep * min(p, d)) singular directions, scaled to ||D_i L_i|| = error * ||W_i L_i||, mapped
    back by L_i^-1 (a deterministic function of the weights and L: the fit recomputes it to measure its own
    objective's error of it)."""
    f = factor.double()
    whitened = weights.double() @ f                                                   # [E, p, d]
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    k = min(s.shape[-1] - 1, max(1, math.ceil(keep * s.shape[-1])))
    tail = (u[..., k:] * s[:, None, k:]) @ vh[:, k:]                                 # [E, p, d]
    norms = whitened.square().sum((1, 2)).sqrt()
    tail_norms = tail.square().sum((1, 2)).sqrt().clamp_min(1e-30)
    tail = tail * (error * norms / tail_norms)[:, None, None]
    return (-torch.linalg.solve_triangular(f, tail, upper=False, left=False)).float()   # D L = -tail


def probe_ids(ids: torch.Tensor, window: int, tokens: int = PROBE_TOKENS) -> torch.Tensor:
    """The probe's sequences [S, T]: whole rows of ids (a [1, n] text split into windows), at most `tokens`."""
    rows = ids if ids.shape[0] > 1 or ids.shape[1] <= window else \
        ids[:, : ids.shape[1] // window * window].reshape(-1, window)
    keep = max(1, tokens // max(rows.shape[1], 1))
    return rows[:keep]


@torch.no_grad()
def _log_probs(model: nn.Module, ids: torch.Tensor, batch: int) -> torch.Tensor:
    device = next(model.parameters()).device
    parts = [F.log_softmax(model(input_ids=ids[i:i + batch].to(device), use_cache=False).logits.float(), -1).cpu()
             for i in range(0, ids.shape[0], batch)]
    return torch.cat(parts)                                                           # [S, T, V]


def _kl(reference: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean KL(reference || log_probs) per token, in nats."""
    return float((reference.exp() * (reference - log_probs)).sum(-1).mean())


@torch.no_grad()
def layer_sensitivity(model: nn.Module, ids: torch.Tensor, stats: ActivationStats, window: int = 256,
                      tokens: int = PROBE_TOKENS, keep: float = PROBE_KEEP, error: float = PROBE_ERROR,
                      batch: int = 8) -> dict[str, Any]:
    """KL per token of the model with one layer's gate (or up) experts perturbed (`perturbation`), for every MoE
    layer and family; the model's weights are restored after each. Returns the probe's record (JSON-able):
    {"format_version", "layers", "kl": {family: [per layer]}, "keep", "error", "tokens", "seconds"}."""
    t0 = time.perf_counter()
    modules = experts_modules(model)
    layout = model_arch(model)[0].layout
    if sorted(modules) != sorted(stats.layers):
        raise ConfigError(f"the sensitivity probe needs statistics of every MoE layer {sorted(modules)}, got "
                          f"{stats.layers}")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    seqs = probe_ids(ids, window, min(tokens, max(1, PROBE_LOGIT_BYTES // (4 * vocab))))
    reference = _log_probs(model, seqs, batch)
    kl: dict[str, list[float]] = {f: [] for f in FAMILIES}
    for layer in progress(list(modules), "sensitivity probe"):
        module = modules[layer]
        factor = layer_factor(stats, layer)
        for family in FAMILIES:
            original = layout.weight(module, family).detach().clone()                # [E, p, d]
            delta = perturbation(original.float(), factor, keep, error)
            layout.set_weights(module, {family: (original.float() + delta).to(original.dtype)})
            try:
                kl[family].append(_kl(reference, _log_probs(model, seqs, batch)))
            finally:
                layout.set_weights(module, {family: original})
    seconds = time.perf_counter() - t0
    log.info("sensitivity probe: %d layers x %d families on %d tokens in %.1f s; KL gate %s, up %s", len(modules),
             len(FAMILIES), seqs.numel(), seconds, [f"{v:.2e}" for v in kl["gate"]], [f"{v:.2e}" for v in kl["up"]])
    return {"format_version": SENSITIVITY_FORMAT_VERSION, "layers": list(modules), "kl": kl, "keep": keep,
            "error": error, "tokens": int(seqs.numel()), "seconds": round(seconds, 2)}
