"""`globe compress --size`: the kind of family chosen by measured behaviour, not by a fixed rule.

    held = held_out(model_dir, calibration, seed)     # before the calibration: tokens its statistics never see
    result = fit_candidates(model_dir, cfg, plans, work, held, metrics)   # each plan fitted, the lowest KL kept

Where more than one kind of family fits the size (globe.fit.planning.bytes.size_plans: factors only; plain
quantization of the experts, which is only per-expert GPTQ and cheap next to the factors' fit), each is built with
the same calibration statistics and the model it gives is scored by KL(original || compressed) on held-out
CALIBRATION tokens (never the user's evaluation text; globe.tune's teacher targets and mean KL, the helpers the
distillation accepts or rejects with). The lowest KL is kept (ties: the earlier plan, SIZE_RULE's first), so the
choice is seeded and deterministic. Held-out tokens: data-free, HELD_OUT_TOKENS tokens the model samples itself with
the fit's seed + HELD_OUT_SEED_OFFSET (never the calibration's sequences); with --calibration-text, the text's
tokens after those the statistics see, or, where the text has too few, its last share, taken away from the
statistics. Every candidate's KL and bytes and the choice go into result.source["size"]["choice"] (so the model
card and the command's output). Without calibration (--no-calibration) there is nothing to score: SIZE_RULE's plan
is fitted alone.
"""
from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from globe.calibration.self_text import SelfText, self_generated_ids
from globe.core.result import FitResult
from globe.errors import ConfigError
from globe.eval import encode_text
from globe.export import load_model
from globe.fit.planning.bytes import SizePlan, apply_plan, result_bytes
from globe.run.calibrate import CalibrateRun
from globe.run.fit import FitRun, run_fit
from globe.run.tokenizer import load_tokenizer, read_text
from globe.runtime import apply_globe
from globe.tune.config import DistillConfig
from globe.tune.distill import mean_kl
from globe.tune.targets import teacher_targets

log = logging.getLogger(__name__)
HELD_OUT_TOKENS = 2048          # held-out calibration tokens scored per candidate
HELD_OUT_SEED_OFFSET = 1        # data-free: sampled with the fit's seed + this (the calibration uses the seed)
HELD_OUT_SHARE = 0.125          # a text too short for HELD_OUT_TOKENS beyond the calibration: its last share


@dataclass
class HeldOut:
    """Held-out calibration tokens: ids [S, T] (None: sampled from the model when scoring) and where they come from."""

    ids: torch.Tensor | None
    info: dict


def held_out(model_dir: str, calibration: CalibrateRun, seed: int, tokens: int = HELD_OUT_TOKENS) -> HeldOut:
    """The held-out tokens of a run calibrated by `calibration` (whose max_tokens may be lowered here, before it
    runs, so that its statistics never see them)."""
    window = calibration.window
    if calibration.text is None:
        return HeldOut(None, {"source": "self-generated", "tokens": tokens, "seed": seed + HELD_OUT_SEED_OFFSET,
                              "length": window})
    limit = 64 * (calibration.max_tokens + tokens) if calibration.max_tokens else None   # ~4 characters a token
    text = read_text(calibration.text, calibration.flag, limit)
    ids = encode_text(load_tokenizer(calibration.tokenizer or model_dir), text)
    used = min(calibration.max_tokens or ids.numel(), ids.numel())
    if ids.numel() - used >= min(tokens, window):
        held, first = ids[used:used + tokens], used
    else:                                              # the text's last share, taken from the statistics
        count = max(int(ids.numel() * HELD_OUT_SHARE), 2)
        if ids.numel() - count < 2:
            raise ConfigError(f"--calibration-text {calibration.text} has {ids.numel()} tokens: too few to hold some "
                              f"out for choosing the kind of --size; pass a longer text or --no-calibration")
        first = ids.numel() - count
        held = ids[first:first + tokens]
        calibration.max_tokens = min(used, first)
    rows = max(held.numel() // window, 1)
    held = held[:rows * window].view(rows, -1) if held.numel() >= window else held.view(1, -1)
    return HeldOut(held, {"source": "text", "text": str(Path(calibration.text).resolve()), "first_token": int(first),
                          "tokens": int(held.numel())})


def _sampled(model, held: HeldOut) -> torch.Tensor:
    if held.ids is None:
        spec = SelfText(tokens=held.info["tokens"], length=held.info["length"], seed=held.info["seed"])
        held.ids = self_generated_ids(model, spec)
    return held.ids


@torch.no_grad()
def score(model_dir: str, results: list[FitResult], held: HeldOut, device: str | None = None) -> list[float]:
    """KL(original || compressed) in nats per token on the held-out ids, for each result (factored mode)."""
    cfg = DistillConfig()
    original = load_model(model_dir, torch.float32, device)
    original.eval()
    ids = _sampled(original, held)
    targets = teacher_targets(original, ids, cfg.top_k, cfg.batch)
    del original
    kls = []
    for result in results:
        model = load_model(model_dir, torch.float32, device)
        model.eval()
        apply_globe(model, result, mode="factored")
        kls.append(mean_kl(model, ids, targets, cfg.batch))
        del model
    return kls


def _stored(result: FitResult) -> tuple[int | None, float | None]:
    """(bytes of all tensors, bits per routed weight of the fitted families) by the byte model."""
    b = result_bytes(result)
    if b is None:
        return None, None
    stored = sum(f["stored"] for f in b["families"].values())
    dense = sum(f["dense"] for f in b["families"].values()) / b["value_bytes"]
    return b["after"], round(8 * stored / dense, 4)


def candidate_config(cfg, plan: SizePlan, quiet: bool = False):
    """A copy of cfg set to the plan; the whole-expert phase off where the plan cannot take it (quantized residuals:
    FitConfig.expert_refusal), with one INFO line unless quiet."""
    c = apply_plan(copy.deepcopy(cfg), plan)
    why = c.expert_refusal() if c.expert.enabled else None
    if why is not None:
        c.expert.steps = 0
        if not quiet:
            log.info("--size candidate %s: whole-expert phase off (it needs factors without residuals)", plan.kind)
    return c


def build_candidates(model_dir: str, cfg, plans: list[SizePlan], work: Path, held: HeldOut,
                     device: str | None = None) -> tuple[list[FitResult], dict]:
    """Fit cfg (calibrated: its statistics set) set to each plan into work/artifact-{kind} (metrics in
    work/metrics-{kind}.jsonl) and score each: (the fits, the choice: every candidate's kind, plan, KL and bytes,
    the held-out tokens, the chosen kind and its index)."""
    results = []
    for i, plan in enumerate(plans):
        c = candidate_config(cfg, plan).validate()
        log.info("--size candidate %d of %d: %s", i + 1, len(plans), plan.describe())
        results.append(run_fit(FitRun(model_dir, str(work / f"artifact-{plan.kind}"), c, overwrite=True,
                                      metrics=str(work / f"metrics-{plan.kind}.jsonl"))))
    kls = score(model_dir, results, held, device)
    best = min(range(len(plans)), key=lambda i: (kls[i], i))
    candidates = []
    for plan, result, kl in zip(plans, results, kls):
        total, bits = _stored(result)
        candidates.append({"kind": plan.kind, "describe": plan.describe(), "kl": kl, "bytes": total,
                           "bits_per_weight": bits, "plan": plan.to_dict()})
    info = {"by": "KL(original || compressed) on held-out calibration tokens", "held_out": held.info,
            "candidates": candidates, "chosen": plans[best].kind, "index": best}
    log.info("--size: %s", choice_line(info))
    return results, info


def fit_candidates(model_dir: str, cfg, plans: list[SizePlan], work: Path, held: HeldOut, metrics: str,
                   device: str | None = None) -> FitResult:
    """build_candidates, then the lowest-KL fit (ties: the earlier plan) with source["size"] = its plan +
    {"choice": ...}; its metrics copied to `metrics`."""
    results, info = build_candidates(model_dir, cfg, plans, work, held, device)
    best = info["index"]
    chosen = results[best]
    chosen.source["size"] = {**plans[best].to_dict(), "choice": info}
    if (work / f"metrics-{plans[best].kind}.jsonl").is_file():                     # the kept fit's metrics
        shutil.copyfile(work / f"metrics-{plans[best].kind}.jsonl", metrics)
    return chosen


def choice_line(choice: dict) -> str:
    """The candidates' KL and bits and the choice, in one line."""
    parts = [f"{c['kind']} ({c['describe']}) KL {c['kl']:.6g}" + (f" at {c['bits_per_weight']:.2f} bits"
                                                                  if c.get("bits_per_weight") else "")
             for c in choice["candidates"]]
    held = choice["held_out"]
    return (f"kind chosen by KL on {held.get('tokens', '?')} held-out calibration tokens ({held['source']}): "
            f"{'; '.join(parts)} -> {choice['chosen']}")

