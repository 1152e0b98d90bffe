"""fit_model: a checkpoint streamed family by family through fit_family (globe.fit.engine.family), with the
resume store, the objective each family is fitted under and the spilling of large finished families."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from globe.calibration.stats import ActivationStats
from globe.core.result import FamilyFit, FitResult
from globe.device import resolve_device
from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.constants import SPILL_FAMILY_BYTES
from globe.fit.engine.expert import expert_applies, expert_stage, output_data
from globe.fit.engine.family import fit_family
from globe.fit.engine.phases import phase
from globe.fit.engine.quant_expert import quant_expert_stage
from globe.fit.engine.quantize import quantize_applies, quantize_family
from globe.fit.objectives.base import objective_class
from globe.fit.objectives.expert_output import expert_losses
from globe.fit.objectives.sensitivity import output_gains, probe_of
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.parallel.shard import read_shard
from globe.fit.resume import FitStore
from globe.fit.solvers.metrics import error_metrics
from globe.io import open_checkpoint

log = logging.getLogger(__name__)


def result_bytes(fam: FamilyFit) -> int:
    """Bytes a finished family's tensors hold in memory."""
    return sum(t.numel() * t.element_size() for t in (fam.bank, fam.codes, fam.adapters, fam.scales))


def _unquantized(cfg: FitConfig) -> FitConfig:
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, bits=None))


def expert_then_quantize(reader, families: dict[str, FamilyFit], cfg: FitConfig, data, kind) -> dict[str, FamilyFit]:
    """The expert phase (globe.fit.engine.expert; with cfg.expert.steps > 0) on the fitted, unquantized gate and
    up, then (with cfg.quant.bits) the quantize stage of every family: a refined family's adapters are refitted to
    its refined reconstruction (what the expert phase bought), its rel_err measured against the original; then
    (with cfg.expert.quant_steps > 0) the quantized expert phase (globe.fit.engine.quant_expert)."""
    stacks = {f: reader.read_family(f) for f in families}
    routed = _samples(reader, families, stacks, cfg) if expert_applies(cfg) else None   # read once for both phases
    gains = _output_gains(families, routed, cfg, data) if routed is not None else None
    if routed is not None:
        families = _expert(families, routed, cfg, gains)
    if not quantize_applies(cfg):
        return families
    families = _quantize(families, stacks, cfg, data, kind)
    return quant_expert(families, routed, cfg, gains) if quant_expert_applies(cfg) else families


def _output_gains(families: dict[str, FamilyFit], routed: tuple, cfg: FitConfig, data) -> torch.Tensor | None:
    """Per-expert weights [N] of the whole-expert objective from the statistics' sensitivity probe (globe.fit.
    objectives.sensitivity.output_gains; None without a probe or with activation.sensitivity off); the record goes
    into gate's and up's metrics["expert_sensitivity"]."""
    if not (cfg.activation.sensitivity and isinstance(data, ActivationStats) and probe_of(data)):
        return None
    samples, weights = routed
    base = output_data(families, weights, samples, cfg.expert.validation)
    start = expert_losses(base, weights["gate"], weights["up"], cfg.expert.chunk)

    def loss(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        gate, up = (weights[f].float() + deltas[f] if f in deltas else weights[f] for f in ("gate", "up"))
        return expert_losses(base, gate, up, cfg.expert.chunk) - start
    gains, record = output_gains(data, weights, families["gate"].ids, loss, cfg.activation.sensitivity_power)
    for f in ("gate", "up"):
        families[f].metrics["expert_sensitivity"] = record
    return gains


def quant_expert_applies(cfg: FitConfig) -> bool:
    """Whether the quantized expert phase runs: on quantized factors (no residual) after the expert phase."""
    return expert_applies(cfg) and cfg.expert.quant_steps > 0 and quantize_applies(cfg) \
        and cfg.quant.residual_bits is None


def _quantize(families: dict[str, FamilyFit], stacks: dict, cfg: FitConfig, data, kind) -> dict[str, FamilyFit]:
    out = {}
    for family, fam in families.items():
        original = _ordered(stacks[family], fam.ids)
        objective = kind.for_family(data, family, stacks[family], cfg)
        refined = fam.metrics.get("expert", {}).get("accepted", False)
        target = fam.reconstruct().to(original.dtype) if refined else original
        with phase(fam.metrics.setdefault("timings", {}), "quantize", resolve_device(cfg.train.device), family):
            out[family] = quantize_family(target, fam, cfg, objective)
        if refined:
            out[family].metrics.update(_weight_errors(out[family], original))
    return out


def _samples(reader, families: dict[str, FamilyFit], stacks: dict, cfg: FitConfig):
    """(routed samples, original gate / up / down in the families' expert order)."""
    from globe.calibration.routed import load_routed
    if cfg.expert.samples_file is None:
        raise ConfigError("expert.steps > 0 needs routed samples (expert.samples_file): `globe compress "
                          "--expert-steps N` collects them at calibration")
    ids = families["gate"].ids
    down = stacks["down"] if "down" in stacks else reader.read_family("down")
    weights = {"gate": _ordered(stacks["gate"], ids), "up": _ordered(stacks["up"], ids), "down": _ordered(down, ids)}
    return load_routed(cfg.expert.samples_file), weights


def _expert(families: dict[str, FamilyFit], routed: tuple, cfg: FitConfig,
            gains: torch.Tensor | None = None) -> dict[str, FamilyFit]:
    samples, weights = routed
    timings: dict = {}
    with phase(timings, "expert", resolve_device(cfg.train.device), "gate+up"):
        families, _ = expert_stage(families, weights, samples, cfg.expert, cfg.train.seed, gains)
    for f in ("gate", "up"):
        families[f].metrics.setdefault("timings", {})["expert"] = timings["expert"]
    return families


def quant_expert(families: dict[str, FamilyFit], routed: tuple, cfg: FitConfig,
                 gains: torch.Tensor | None = None) -> dict[str, FamilyFit]:
    """The quantized expert phase (globe.fit.engine.quant_expert) on the quantized gate and up of `families`
    (routed: _samples' (routed samples, original weights), the expert phase's); their rel_err measured against the
    original weights again."""
    samples, weights = routed
    value_dtype = weights["gate"].dtype if weights["gate"].dtype.is_floating_point else torch.float32
    timings: dict = {}
    with phase(timings, "quant_expert", resolve_device(cfg.train.device), "gate+up"):
        families, info = quant_expert_stage(families, weights, samples, cfg.expert, cfg.train.seed, value_dtype,
                                            gains)
    for f in ("gate", "up"):
        families[f].metrics.setdefault("timings", {})["quant_expert"] = timings["quant_expert"]
        if info["accepted"]:
            families[f].metrics.update(_weight_errors(families[f], weights[f]))
    return families


def _ordered(stack, ids: torch.Tensor) -> torch.Tensor:
    """The stack's weights [N, rows, cols] in the order of ids [N, 2]."""
    if torch.equal(stack.ids, ids):
        return stack.weights
    where = {(int(l), int(e)): i for i, (l, e) in enumerate(stack.ids.tolist())}
    return stack.weights[torch.tensor([where[(int(l), int(e))] for l, e in ids.tolist()])]


def _weight_errors(fam: FamilyFit, weights: torch.Tensor) -> dict:
    """rel_err of a family against the original weights (the quantize stage saw the refined ones)."""
    sq_err = (weights.float() - fam.reconstruct()).square().sum((1, 2)).double()
    sq_norms = weights.float().square().sum((1, 2)).double()
    return error_metrics(sq_err, sq_norms, fam.ids)


def fit_model(model_dir: str | Path, cfg: FitConfig | None = None, store: FitStore | None = None,
              comm: Comm = LOCAL) -> FitResult | None:
    """Fit every configured family of the checkpoint in model_dir (see globe.io for supported layouts).

    Family k is seeded with cfg.train.seed + k. With a store (globe.run.resume_store.ResumeStore), finished
    families are taken from it, a family in progress continues from its last checkpoint, and new progress and
    families are saved to it: a resumed run's result equals an uninterrupted one's, bit for bit.
    Distributed (comm from globe.fit.parallel.comm.init_comm; no store): each rank reads and fits its slice of the
    experts; rank 0 returns the FitResult, the other ranks return None.
    """
    cfg = (cfg or FitConfig()).validate()
    expert = expert_applies(cfg) and comm.world == 1
    family_cfg = _unquantized(cfg) if expert and quantize_applies(cfg) else cfg   # quantize after the expert phase
    families: dict[str, FamilyFit] = {}
    t0 = time.perf_counter()
    kind = objective_class(cfg)
    with open_checkpoint(model_dir) as reader:
        inventory = reader.inventory()
        cfg.check_dims(len(inventory.moe_layers) * inventory.num_experts, inventory.p, inventory.d)
        data = kind.load(cfg, inventory)                    # e.g. the calibration statistics, read once
        content = reader.content_hash()
        for k, family in enumerate(cfg.bank.families):
            fam = store.finished(family) if store is not None else None
            if fam is not None:
                log.info("%s: taken from checkpoint", family)
                families[family] = fam
                continue
            stack = read_shard(reader, family, comm)        # one process: lazy, experts read chunk by chunk
            gen = torch.Generator().manual_seed(cfg.train.seed + k)
            resume = store.progress(family) if store is not None else None
            save = (lambda prog, f=family: store.save_progress(f, prog)) if store is not None else None
            objective = kind.for_family(data, family, stack, cfg)
            families[family] = fit_family(stack.weights, stack.ids, family_cfg, family, gen, resume, save, comm,
                                          objective)
            del stack
            if store is not None and families[family] is not None:
                store.save_family(families[family])
                if k + 1 < len(cfg.bank.families) and result_bytes(families[family]) >= SPILL_FAMILY_BYTES:
                    log.info("%s: result kept on disk until the last family is fitted", family)
                    families[family] = None                 # spilled: read back below
        if not comm.is_main:
            return None
        families = {f: fam if fam is not None else store.reload(f) for f, fam in families.items()}
        if expert:                                          # the deferred quantize stage runs after it
            families = expert_then_quantize(reader, families, cfg, data, kind)
    source = {"model_dir": str(Path(model_dir).resolve()), "model_type": inventory.model_type,
              "content_hash": content, "inventory": inventory.to_dict()}
    return FitResult(families={f: families[f] for f in cfg.bank.families}, config=cfg, source=source,
                     timings={"total_seconds": round(time.perf_counter() - t0, 3)})
