"""Distillation of the compressed parameters to the original model's next-token distribution.

    result, info = distill(original, result, ids, DistillConfig(steps=100, lr=1e-3))

`original` is the loaded original model (fp32 for training); it is used twice: first its logits on the calibration
sequences ids [S, T] are computed once and kept (globe.tune.targets: top_k log-probs per token), then it is
patched in place with the fit (globe.runtime.apply_globe, factored mode) and becomes the student, so the caller
must not use it afterwards. Only the GloBE factors train: the family banks, the nonzero code values (the sparsity
pattern of the codes is fixed: padding entries get no gradient and stay exactly zero) and the adapters, into which
the fit has folded each expert's scale; every other parameter is frozen and unchanged bit for bit. A fit whose
bank and adapters are stored quantized (cfg.quant.bits) trains its code values only, so the quantized parts stay
valid. Adam with a cosine decay, each factor's step cfg.lr x its RMS, cfg.batch sequences per step drawn by a
seeded torch.Generator; on the CPU on one thread.
The last cfg.validation share of the sequences is held out: the distilled factors are kept only when their KL on
it is lower than the fit's, else the fit is returned unchanged (info["accepted"] says which).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch import nn

from globe.core.result import FamilyFit, FitResult
from globe.device import one_cpu_thread
from globe.errors import ConfigError
from globe.progress import progress
from globe.runtime import apply_globe, globe_modules
from globe.runtime.apply import layer_rows
from globe.tune.config import DistillConfig
from globe.tune.targets import Targets, kl_loss, logits_of, teacher_targets

log = logging.getLogger(__name__)
FACTORS = ("bank", "code_values", "adapters")


def trained_parts(result: FitResult) -> tuple[str, ...]:
    """What trains: every factor, or only the code values of a fit stored quantized."""
    return ("code_values",) if any(fam.quant for fam in result.families.values()) else FACTORS


def _freeze_all_but(model: nn.Module, parts: tuple[str, ...]) -> list[nn.Parameter]:
    """requires_grad only on the GloBE factors named in parts; zero padding code values get no gradient."""
    for param in model.parameters():
        param.requires_grad_(False)
    trained: dict[int, nn.Parameter] = {}
    for module in globe_modules(model).values():
        for part in parts:
            for family, param in getattr(module, part).items():
                param.requires_grad_(True)
                if part == "code_values" and id(param) not in trained:
                    mask = (param.detach() != 0).to(param.dtype)                      # [E, k]
                    param.register_hook(lambda grad, mask=mask: grad * mask)
                trained[id(param)] = param
    return list(trained.values())


@torch.no_grad()
def mean_kl(model: nn.Module, ids: torch.Tensor, targets: Targets, batch: int) -> float:
    total = 0.0
    for first in range(0, ids.shape[0], batch):
        rows = torch.arange(first, min(first + batch, ids.shape[0]))
        total += float(kl_loss(logits_of(model, ids[rows]), targets.rows(rows))) * rows.numel()
    return total / ids.shape[0]


def _family_from(model: nn.Module, fam: FamilyFit, name: str, parts: tuple[str, ...]) -> FamilyFit:
    """fam with the factors the patched model holds now (fam's dtypes; adapter columns past r_l stay zero)."""
    modules = globe_modules(model)
    rows = layer_rows(fam, sorted(modules), next(iter(modules.values())).num_experts)
    codes, adapters = fam.codes.clone(), fam.adapters.clone()
    for layer, module in modules.items():
        idx, values = module.code_indices[name], module.code_values[name].detach()          # [E, k]
        full = torch.zeros(values.shape[0], codes.shape[1], dtype=torch.float32, device=values.device)
        full.scatter_add_(1, idx, values.float())                                          # padding adds 0
        codes[rows[layer]] = full.to(codes)
        if "adapters" in parts:                          # packed (quantized) adapters are frozen: never read back
            adapter = module.adapters[name].detach()                                       # [E, p, r_l]
            adapters[rows[layer], :, :adapter.shape[-1]] = adapter.to(adapters)
    bank = next(iter(modules.values())).bank[name].detach().to(fam.bank) if "bank" in parts else fam.bank
    metrics = {**fam.metrics, "distilled": list(parts)}
    return dataclasses.replace(fam, bank=bank if "bank" in parts else fam.bank, codes=codes,
                               adapters=adapters if "adapters" in parts else fam.adapters, metrics=metrics)


def _copied(result: FitResult) -> FitResult:
    families = {name: dataclasses.replace(fam, bank=fam.bank.clone(), codes=fam.codes.clone(),
                                          adapters=fam.adapters.clone()) for name, fam in result.families.items()}
    return dataclasses.replace(result, families=families)


def _groups(params: list[nn.Parameter], lr: float) -> list[dict]:
    """One Adam group per factor, its step lr x the factor's RMS (nonzero entries): banks, adapters and code values
    differ in scale by orders of magnitude, so one absolute step size fits none of them."""
    groups = []
    for param in params:
        nonzero = param.detach()[param.detach() != 0]
        rms = float(nonzero.float().pow(2).mean().sqrt()) if nonzero.numel() else 1.0
        groups.append({"params": [param], "lr": lr * rms})
    return groups


def _split(ids: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    held = min(int(round(ids.shape[0] * share)), ids.shape[0] - 1) if share > 0 else 0
    if share > 0 and held == 0 and ids.shape[0] > 1:
        held = 1
    return ids[:ids.shape[0] - held], ids[ids.shape[0] - held:]


def _train(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, targets: Targets,
           cfg: DistillConfig) -> list[float]:
    """cfg.steps Adam steps on batches of ids [S, T] drawn by a seeded generator (epochs of permutations)."""
    opt = torch.optim.Adam(_groups(params, cfg.lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, at, losses = torch.randperm(ids.shape[0], generator=gen), 0, []
    for _ in progress(range(cfg.steps), "distill"):
        if at + cfg.batch > order.numel():
            order, at = torch.randperm(ids.shape[0], generator=gen), 0
        rows = order[at:at + cfg.batch]
        at += cfg.batch
        loss = kl_loss(logits_of(model, ids[rows]), targets.rows(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def distill(model: nn.Module, result: FitResult, ids: torch.Tensor,
            cfg: DistillConfig) -> tuple[FitResult, dict]:
    """(the distilled FitResult or `result` itself, what happened); see the module docstring. ids: [S, T]."""
    with one_cpu_thread(next(model.parameters()).device):
        return _distill(model, result, ids, cfg)


def _distill(model: nn.Module, result: FitResult, ids: torch.Tensor,
             cfg: DistillConfig) -> tuple[FitResult, dict]:
    cfg.check()
    if not cfg.enabled:
        return result, {"steps": 0}
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ConfigError(f"distillation needs calibration sequences [S, T >= 2], got shape {tuple(ids.shape)}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    train_ids, val_ids = _split(ids, cfg.validation)
    was_training = model.training
    model.eval()
    targets = teacher_targets(model, ids, cfg.top_k, cfg.batch)
    train_t = targets.rows(torch.arange(train_ids.shape[0]))
    val_t = targets.rows(torch.arange(train_ids.shape[0], ids.shape[0]))
    parts = trained_parts(result)
    if parts != FACTORS:
        log.info("distillation: the bank and adapters are stored quantized; only the code values train")
    apply_globe(model, _copied(result), mode="factored")                 # never trains result's own tensors
    params = _freeze_all_but(model, parts)
    before = mean_kl(model, val_ids, val_t, cfg.batch) if val_ids.shape[0] else None
    losses = _train(model, params, train_ids, train_t, cfg)
    after = mean_kl(model, val_ids, val_t, cfg.batch) if val_ids.shape[0] else None
    model.train(was_training)
    accepted = before is None or after < before
    info = {"config": cfg.to_dict(), "trained": list(parts), "params": sum(p.numel() for p in params),
            "train_sequences": int(train_ids.shape[0]), "validation_sequences": int(val_ids.shape[0]),
            "tokens_per_sequence": int(ids.shape[1]), "train_kl_first": losses[0], "train_kl_last": losses[-1],
            "validation_kl_before": before, "validation_kl_after": after, "accepted": accepted,
            "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2)}
    log.info("distillation: %d steps, validation KL %s -> %s (%s)", cfg.steps, before, after,
             "kept" if accepted else "rejected: the fit is kept")
    if not accepted:
        return dataclasses.replace(result, source={**result.source, "distill": info}), info
    families = {name: _family_from(model, fam, name, parts) for name, fam in result.families.items()}
    return dataclasses.replace(result, families=families, source={**result.source, "distill": info}), info


def sequences(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Calibration ids as sequences [S, T]: sampled sequences as they are, one long text [1, n] cut into windows of
    `length` tokens (the remainder dropped)."""
    if ids.dim() == 2 and (ids.shape[0] > 1 or ids.shape[1] <= length):
        return ids
    flat = ids.reshape(-1)
    count = flat.numel() // length
    if count < 1:
        return flat[None]
    return flat[:count * length].view(count, length)


def distill_checkpoint(model_dir: str, result: FitResult, ids: torch.Tensor, cfg: DistillConfig,
                       window: int = 256, device: str | None = None) -> tuple[FitResult, dict]:
    """distill() with the original loaded from model_dir in fp32 (on `device`) and ids cut into windows."""
    from globe.export import load_model
    if not cfg.check().enabled:
        return result, {"steps": 0}
    return distill(load_model(model_dir, torch.float32, device), result, sequences(ids, window), cfg)
