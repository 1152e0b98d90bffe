"""The expert phase: gate and up refined together on the whole expert's output (cfg.expert, off by default).

    families, info = expert_stage({"gate": g, "up": u}, weights, samples, cfg.expert, seed)

Runs in fit_model once gate and up are fitted (each under its own per-matrix objective) and before the quantize
stage: the compressed parameters of both families (each family's bank, its nonzero code values, its adapters;
nothing else) take cfg.steps full-batch Adam steps on the router-weighted output error of every routed expert
(globe.fit.objectives.expert_output) on the routed samples of calibration (globe.calibration.routed). The codes'
sparsity pattern is fixed (gradients masked; a kept code never reaches 0 or changes sign), adapter columns past a
layer's rank stay zero, the original down projections are only read (a fitted down family enters the prediction
as it is, its reconstruction, and is not trained). Each factor's step is cfg.lr x its RMS,
with a cosine decay; every cfg.eval_every steps the error on the held-out share of each expert's samples is
measured and the best state is kept (the fit itself when no step beats it). Experts are processed in chunks of
cfg.chunk, gradients summed, so memory is bounded by the samples (capped at calibration) and one chunk's
activations. Each step sees cfg.batch training samples per expert (cfg.batch 0: all of them), drawn by a
torch.Generator seeded with the fit's seed: the same inputs and seed give the same result.
The loop (train_output) and the objective's data (output_data) are shared with the quantized expert phase
(globe.fit.engine.quant_expert), which trains the float parts of the quantized factors after the quantize stage.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from globe.calibration.routed import RoutedSamples
from globe.core.mixing import compose
from globe.core.result import FamilyFit
from globe.errors import ConfigError
from globe.fit.engine.duplicates import tie_duplicates
from globe.fit.expert_config import ExpertConfig
from globe.fit.objectives.expert_output import ExpertData, expert_data, output_loss
from globe.fit.solvers.mod import normalize_atoms
from globe.progress import progress

log = logging.getLogger(__name__)

FAMILIES = ("gate", "up")
PARTS = ("bank", "codes", "adapters")


def expert_applies(cfg) -> bool:
    """Whether a fit with FitConfig cfg runs the expert phase (steps > 0, both gate and up fitted)."""
    return cfg.expert.enabled and set(FAMILIES) <= set(cfg.bank.families)


class _Params:
    """The trained tensors of both families (fp32 leaves) with their masks."""

    def __init__(self, families: dict[str, FamilyFit]) -> None:
        self.phi = {f: families[f].phi for f in FAMILIES}
        self.tensors = {(f, part): getattr(families[f], part).detach().float().clone().requires_grad_(True)
                        for f in FAMILIES for part in PARTS}
        self.code_mask = {f: families[f].codes != 0 for f in FAMILIES}                       # [N, m]
        self.nonneg = {f: bool((families[f].codes >= 0).all()) for f in FAMILIES}
        self.column_mask = {f: (families[f].adapters != 0).any(1, keepdim=True) for f in FAMILIES}   # [N, 1, r]

    def weights(self, family: str, lo: int, hi: int) -> torch.Tensor:
        """W_hat_i = A_i phi(sum_j alpha_ij B_j) for experts lo:hi: [hi - lo, p, d]."""
        t = self.tensors
        return t[family, "adapters"][lo:hi] @ compose(t[family, "codes"][lo:hi], t[family, "bank"], self.phi[family])

    def mask_grads(self) -> None:
        for f in FAMILIES:
            codes, adapters = self.tensors[f, "codes"], self.tensors[f, "adapters"]
            if codes.grad is not None:
                codes.grad.mul_(self.code_mask[f])
            if adapters.grad is not None:
                adapters.grad.mul_(self.column_mask[f])

    @torch.no_grad()
    def project(self) -> None:
        """Kept codes stay nonzero (and non-negative for a non-negative fit): the sparsity pattern is fixed."""
        for f in FAMILIES:
            keep_codes(self.tensors[f, "codes"], self.code_mask[f], self.nonneg[f])

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def evaluated(self) -> _Params:
        return self

    def groups(self, lr: float) -> list[dict]:
        return rms_groups(self.tensors.values(), lr)


def rms_groups(params, lr: float) -> list[dict]:
    """One Adam parameter group per tensor, its step lr x the RMS of its nonzero entries (1 where it has none)."""
    out = []
    for param in params:
        nonzero = param.detach()[param.detach() != 0]
        rms = float(nonzero.square().mean().sqrt()) if nonzero.numel() else 1.0
        out.append({"params": [param], "lr": lr * rms})
    return out


@torch.no_grad()
def keep_codes(codes: torch.Tensor, mask: torch.Tensor, nonneg: bool) -> None:
    """codes [N, m] in place: the kept entries (mask) stay nonzero, at least 1e-6 of their mean magnitude (and
    non-negative for a non-negative fit), the others zero: the sparsity pattern is fixed."""
    floor = 1e-6 * float(codes[mask].abs().mean()) if bool(mask.any()) else 0.0
    if nonneg:
        fixed = codes.clamp_min(floor)
    else:
        fixed = torch.where(codes.abs() < floor, torch.full_like(codes, floor) * codes.sign().clamp_min(0)
                            .mul(2).sub(1), codes)
    codes.copy_(torch.where(mask, fixed, torch.zeros_like(codes)))


def _batch(data: ExpertData, size: int, gen: torch.Generator) -> torch.Tensor | None:
    """[N, size] sample positions drawn uniformly among each expert's training samples (None: all of them)."""
    if size <= 0 or size >= data.x.shape[1]:
        return None
    count = data.train.sum(1).clamp_min(1)                                            # [N] (train = a prefix)
    return (torch.rand(data.n, size, generator=gen) * count[:, None]).long().clamp_max(data.x.shape[1] - 1)


def _loss(params: _Params, data: ExpertData, chunk: int, validation: bool, backward: bool,
          index: torch.Tensor | None = None) -> float:
    total = 0.0
    for lo in range(0, data.n, chunk):
        hi = min(lo + chunk, data.n)
        with torch.set_grad_enabled(backward):
            loss = output_loss(data, lo, hi, params.weights("gate", lo, hi), params.weights("up", lo, hi), validation,
                               None if index is None else index[lo:hi])
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def _family(fam: FamilyFit, state: dict, family: str, info: dict) -> FamilyFit:
    bank, codes = normalize_atoms(state[family, "bank"], state[family, "codes"])
    codes, adapters = codes.to(fam.codes.dtype).clone(), state[family, "adapters"].to(fam.adapters.dtype).clone()
    copies = {c: f for c, f in fam.metrics.get("duplicates") or []}   # each copy refined on its own tokens: the
    tie_duplicates(copies, codes, adapters)                            # first occurrence's factors again
    return dataclasses.replace(fam, bank=bank.to(fam.bank.dtype), codes=codes, adapters=adapters,
                               metrics={**fam.metrics, "expert": info},
                               history={**fam.history, "expert": info["validation_history"]})


def output_data(families: dict[str, FamilyFit], weights: dict[str, torch.Tensor], samples: RoutedSamples,
                validation: float, gains: torch.Tensor | None = None) -> ExpertData:
    """The whole-expert objective's data for gate and up of `families` (same experts, same order): the original
    weights give the targets, a fitted down family enters the prediction as its reconstruction; gains [N]: each
    expert's term weighted (its layer's sensitivity, globe.fit.objectives.sensitivity.output_gains; None: 1)."""
    gate, up = families["gate"], families["up"]
    if not torch.equal(gate.ids, up.ids):
        raise ConfigError("the expert phase needs gate and up fitted on the same experts in the same order")
    down_hat = families["down"].reconstruct() if "down" in families else None   # what the model will compute with
    data = expert_data(samples, gate.ids, weights["gate"], weights["up"], weights["down"], validation, down_hat)
    return data.weighted(gains)


def train_output(params, data: ExpertData, cfg: ExpertConfig, seed: int, label: str) -> tuple[dict, dict | None]:
    """cfg.steps Adam steps of `params` on the whole-expert output error (shared by the expert phase and the
    quantized expert phase, globe.fit.engine.quant_expert): (info, the best state or None when no step beat the
    start). params: weights(family, lo, hi) -> [hi - lo, p, d], groups(lr), mask_grads(), project(), state(), and
    evaluated() -> the params the held-out selection scores (e.g. rounded to their storage dtypes)."""
    t0 = time.perf_counter()
    use_valid = bool(data.valid.any())
    opt = torch.optim.Adam(params.groups(cfg.lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(seed)
    first = _loss(params.evaluated(), data, cfg.chunk, use_valid, False)
    best, best_step, best_state = first, 0, None
    history, train_losses = [{"step": 0, "error": first}], []   # records, as the artifact stores histories
    for step in progress(range(1, cfg.steps + 1), label):
        opt.zero_grad(set_to_none=True)
        train_losses.append(_loss(params, data, cfg.chunk, False, True, _batch(data, cfg.batch, gen)))
        params.mask_grads()
        opt.step()
        sched.step()
        params.project()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            now = _loss(params.evaluated(), data, cfg.chunk, use_valid, False)
            history.append({"step": step, "error": now})
            if now < best:
                best, best_step, best_state = now, step, params.state()
    info = {"steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch, "seed": seed, "samples_per_expert": int(data.x.shape[1]),
            "train_samples": int(data.train.sum()), "validation_samples": int(data.valid.sum()),
            "selected_on": "validation" if use_valid else "train", "error_before": first, "error_after": best,
            "best_step": best_step, "train_first": train_losses[0] if train_losses else None,
            "train_last": train_losses[-1] if train_losses else None, "validation_history": history,
            "accepted": best_state is not None, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s: %d steps, whole-expert output error (%s) %.5f -> %.5f (%s)", label, cfg.steps,
             info["selected_on"], first, best, f"step {best_step} kept" if best_state else "no step better: rolled back")
    return info, best_state


def expert_stage(families: dict[str, FamilyFit], weights: dict[str, torch.Tensor], samples: RoutedSamples,
                 cfg: ExpertConfig, seed: int = 0, gains: torch.Tensor | None = None
                 ) -> tuple[dict[str, FamilyFit], dict]:
    """(families with gate and up refined, what happened); see the module docstring. weights: the original gate,
    up [N, p, d] and down [N, h, p] in the families' expert order; gains: output_data's per-expert weights."""
    cfg.check()
    if families["gate"].quant or families["up"].quant:
        raise ConfigError("the expert phase runs before quantization: the families are already quantized")
    data = output_data(families, weights, samples, cfg.validation, gains)
    info, best_state = train_output(_Params(families), data, cfg, seed, "expert phase")
    if best_state is None:
        return {f: dataclasses.replace(fam, metrics={**fam.metrics, "expert": info}) for f, fam in families.items()
                }, info
    out = dict(families)
    for f in FAMILIES:
        out[f] = _family(families[f], best_state, f, info)
    return out, info
