"""Compress runs: calibration, fit, compressed export, optional dense export and evaluation, model card, in one step.

    out = run_compress(CompressRun("path/to/model", "compressed/", total_cut=0.25, text="heldout.txt"))

The fit is activation-aware by default: calibrated on calibration_text when given, else on text the model samples
itself (globe.calibration.self_text, seeded with the fit's seed; no data, no network), calibration_tokens tokens
either way; with a text and calibration_mix > 0 on both (mixed: the text's tokens and calibration_mix x
calibration_tokens self-generated ones, the same sample a run without text takes; globe.run.calibrate; the held-out
tokens of --size's choice still come from the text after those calibrated on); calibrate=False fits in weight
space. With distill.steps > 0 the fitted factors are then distilled to the original's next-token distribution on
the same calibration tokens (globe.tune.distill; kept only where that lowers the KL on held-out calibration
sequences; result.source["distill"] says what happened). Where the calibration came from is recorded in the
artifact's source (result.source["calibration"], so globe_config.json) and in the model card. With `text` the
original and the compressed model are scored on all of it (or its first eval_tokens tokens), the compressed one
also by KL and top-1 agreement to the original.

OUT becomes the compressed checkpoint (AutoModelForCausalLM.from_pretrained(OUT) after `import globe`) with
README.md (model card), globe_config.json and metrics.jsonl of the fit (elsewhere with metrics=FILE); --dense adds the dense-reconstructed
checkpoint next to it (OUT-dense by default). The fit runs in OUT/.globe_fit (its resume files live there while it
runs), which is removed once the export is written: the export holds the artifact (globe.export.load_artifact).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from globe.calibration.routed import save_routed
from globe.core import outputs
from globe.core.result import FitResult
from globe.device import resolve_device
from globe.errors import ConfigError
from globe.export import export_dense, save_compressed
from globe.export.card import write_model_card
from globe.fit.config import FitConfig
from globe.fit.engine.phases import phase
from globe.fit.planning.bytes import SizePlan
from globe.run.calibrate import CalibrateRun, check_calibrate_run, run_calibrate_with_ids
from globe.run.evaluate import EvalText, evaluate_isolated
from globe.run.fit import FitRun, apply_total_cut, run_fit
from globe.run.load import ModelLoad
from globe.run.size_choice import fit_candidates, held_out
from globe.run.tokenizer import read_text
from globe.tune import DistillConfig
from globe.tune.distill import distill_checkpoint

log = logging.getLogger(__name__)
WORK_DIR = outputs.WORK_DIR               # removed by the next run on OUT if a run is killed
DEFAULT_CALIBRATION_TOKENS = 8192         # what the embedded model's main job affords in its time limit
# --calibration-mix: self-generated tokens added to --calibration-text, as a multiple of --calibration-tokens. 1
# (mixed: the text and the sample a run without text takes) on the embedded model: KL 0.96 / 0.77 / 0.60x the text
# alone's at -18 / -25 / -35 % (benchmarks/results/self_calibration_mix_embedded.json, README "Self-generated,
# real and mixed calibration text")
DEFAULT_CALIBRATION_MIX = 1.0


@dataclass
class CompressRun:
    """The model, OUT, how much to cut (total_cut of all params, or the config's per-family budget), and extras."""

    model_dir: str
    out: str
    config: FitConfig = field(default_factory=FitConfig)
    total_cut: float | None = None
    calibration_text: str | None = None       # activation-aware fit on statistics of this text (None: self-generated)
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS   # tokens calibrated on (of the text, or sampled)
    calibration_mix: float = DEFAULT_CALIBRATION_MIX   # with a text: + mix x calibration_tokens self-generated
    calibrate: bool = True                    # False: weight-space fit, no calibration
    dense: bool = False
    dense_out: str | None = None              # default: OUT-dense
    text: str | None = None                   # evaluate original and compressed on this text
    eval_tokens: int | None = None            # tokens of --text scored (None: all)
    overwrite: bool = False
    device: str = "cpu"
    command: str | None = None                # the command line, for the model card
    metrics: str | None = None                # JSONL of the fit's metrics (default OUT/metrics.jsonl)
    size: dict | None = None                  # the --size plan the config was set by (SizePlan.to_dict()), recorded
    size_plans: list[dict] | None = None      # every kind that fits --size (the first: size): fitted, lowest KL kept
    distill: DistillConfig = field(default_factory=DistillConfig)   # after the fit, on the calibration tokens


def expert_default_off(cfg: FitConfig, calibrate: bool) -> str | None:
    """Why the default whole-expert phase of `globe compress` (COMPRESS_STEPS) cannot run with this config and
    calibration (None: it can); an explicit --expert-steps there is refused by _calibration / FitConfig.validate."""
    if not calibrate:
        return "--no-calibration: the phase refines on this run's calibration tokens (none here)"
    if cfg.activation.stats:
        return "a statistics file holds no routed tokens: the phase needs this run's own calibration"
    if not {"gate", "up"} <= set(cfg.bank.families):
        return f"it refines gate and up together, and the fitted families are {', '.join(cfg.bank.families)}"
    return cfg.expert_refusal()


def _calibration(run: CompressRun) -> CalibrateRun | None:
    """The calibration this run does (None: none, weight space or statistics already given); checked now."""
    if run.config.expert.enabled and (not run.calibrate or run.config.activation.stats):
        raise ConfigError("--expert-steps needs this run's calibration (its routed tokens): drop --no-calibration")
    if not run.calibrate or run.config.activation.stats:
        return None
    expert = run.config.expert
    if not (run.calibration_mix >= 0):
        raise ConfigError(f"--calibration-mix must be >= 0 (got {run.calibration_mix})")
    own = round(run.calibration_mix * run.calibration_tokens) if run.calibration_text else 0
    cal = CalibrateRun(run.model_dir, run.calibration_text, "", max_tokens=run.calibration_tokens,
                       device=run.device, seed=run.config.train.seed, flag="--calibration-text",
                       routed=expert.samples if expert.enabled else 0, routed_mb=expert.max_sample_mb,
                       self_tokens=max(own, 2) if own else 0,
                       sensitivity=run.config.activation.sensitivity)    # the probe: globe.calibration.sensitivity
    check_calibrate_run(cal)
    return cal


def _fit(run: CompressRun, work: Path, calibration: CalibrateRun | None, timings: dict) -> FitResult:
    cfg = run.config
    if run.total_cut is not None:
        apply_total_cut(cfg, run.model_dir, run.total_cut)
    info, ids, held = None, None, None
    if calibration is not None and len(run.size_plans or []) > 1:     # globe.run.size_choice
        held = held_out(run.model_dir, calibration, cfg.train.seed)      # before the statistics: never in them
    if calibration is not None:
        calibration.out = str(work / "calibration.safetensors")
        with phase(timings, "calibrate", resolve_device(run.device)):      # timed like the fit's phases
            stats, ids = run_calibrate_with_ids(calibration)
        cfg.activation.stats = calibration.out
        if stats.routed is not None:                   # the expert phase's routed samples (--expert-steps)
            cfg.expert.samples_file = str(save_routed(stats.routed, work / "routed.safetensors"))
        info = stats.info.get("calibration")
        if "sensitivity" in stats.info:                # the probe (globe.calibration.sensitivity), for the record
            info = {**(info or {}), "sensitivity": stats.info["sensitivity"]}
    elif cfg.activation.stats:
        info = {"source": "statistics file", "stats": str(Path(cfg.activation.stats).resolve())}
    metrics = run.metrics or str(work / "metrics.jsonl")               # OUT/metrics.jsonl at the swap
    if held is not None:
        plans = [SizePlan.from_dict(p) for p in run.size_plans]
        result = fit_candidates(run.model_dir, cfg, plans, work, held, metrics, str(resolve_device(run.device)))
    else:
        result = run_fit(FitRun(run.model_dir, str(work / "artifact"), cfg, overwrite=True, metrics=metrics))
        if run.size is not None:
            result.source["size"] = run.size
    result.source["calibration"] = info or {"source": "none (weight-space fit)"}
    return _distill(run, result, ids, calibration)


def _distill(run: CompressRun, result: FitResult, ids, calibration: CalibrateRun | None) -> FitResult:
    """The fit distilled to the original on the calibration tokens (globe.tune.distill), when asked and possible."""
    if not run.distill.enabled:
        return result
    if ids is None:
        log.info("distillation skipped: it needs the calibration tokens of this run (none with --no-calibration "
                 "or a statistics file)")
        return result
    cfg = dataclasses.replace(run.distill, seed=run.config.train.seed)
    distilled, _ = distill_checkpoint(run.model_dir, result, ids, cfg, window=calibration.window,
                                      device=str(resolve_device(run.device)))
    return distilled


def _evaluate(run: CompressRun, out: Path, original: str) -> dict:
    """The original and the compressed model on run.text, each in its own process; the compressed one also by KL
    and top-1 agreement to the original."""
    text = EvalText(text=run.text, max_tokens=run.eval_tokens, repeats=1, decode_tokens=16, prefill_tokens=64)
    return {"original": evaluate_isolated(ModelLoad(run.model_dir, device=run.device), text, compare=False),
            "compressed": evaluate_isolated(ModelLoad(str(out), device=run.device), text, original=original)}


def run_compress(run: CompressRun) -> dict:
    """Run it all; returns {"out", "dense", "result", "evaluation", "card", "timings"} (timings: seconds and peak
    memory of the calibration and the export, the phases outside the fit's own metrics). OUT (and the dense
    directory) follow globe.core.outputs: never an input, replaced only with overwrite, locked while the run lasts, the work
    directory of a killed run removed by the next one, a directory this run created removed again on failure."""
    if run.total_cut is not None and run.config.bank.budget != FitConfig().bank.budget:
        raise ConfigError("give --budget (per family) or --total-cut (of all parameters), not both")
    check_inputs(run)
    out = Path(run.out)
    dense_dir = Path(run.dense_out or f"{str(out).rstrip('/')}-dense") if run.dense else None
    if run.eval_tokens is not None and run.eval_tokens < 2:
        raise ConfigError(f"--eval-tokens must be >= 2 (got {run.eval_tokens}); leave it out to score all of --text")
    calibration = _calibration(run)                    # a bad --calibration-text or count fails before any work
    if run.text:
        read_text(run.text, "--text")                  # and so does a missing, empty or non-UTF-8 --text
    inputs = [run.model_dir, run.calibration_text, run.text, run.config.activation.stats]
    if run.metrics:
        outputs.check_not_an_input(Path(run.metrics), inputs, flag="--metrics")
        outputs.check_log_file(run.metrics, "--metrics", overwrite=run.overwrite)
    outputs.check_apart({"-o": out, "--dense-out": dense_dir, "--metrics": run.metrics})
    with contextlib.ExitStack() as claims:
        claims.enter_context(outputs.claim_output_dir(out, "compress", run.overwrite, what="compressed checkpoint",
                                                      inputs=inputs, keep=()))
        if dense_dir is not None:
            claims.enter_context(outputs.claim_output_dir(dense_dir, "compress", run.overwrite,
                                                          what="dense checkpoint", inputs=inputs, keep=(),
                                                          flag="--dense-out"))
        return _compress(run, out, dense_dir, calibration)


def check_inputs(run: CompressRun) -> None:
    """Every input file and option, before any fitting, loading or writing; messages name the flag."""
    from globe.export.files import check_source_model
    check_source_model(run.model_dir, "MODEL_DIR")
    if run.total_cut is not None and not 0 < run.total_cut < 1:
        raise ConfigError(f"--total-cut must be in (0, 1) (got {run.total_cut})")


def _compress(run: CompressRun, out: Path, dense_dir: Path | None, calibration: CalibrateRun | None) -> dict:
    work = out / WORK_DIR
    done: dict = {}
    timings: dict = {}                                # calibrate and export: {"seconds", "peak_mem_mb"} each

    def finish(staging: Path) -> None:               # inside the export's staging directory: one atomic step
        done["evaluation"] = _evaluate(run, staging, result.source.get("model_dir", run.model_dir)) \
            if run.text else None
        for rep in (done["evaluation"] or {}).values():
            rep.get("model", {})["path"] = str(out) if rep.get("model", {}).get("path") == str(staging) \
                else rep.get("model", {}).get("path")
        if (work / "metrics.jsonl").is_file():
            shutil.copyfile(work / "metrics.jsonl", staging / "metrics.jsonl")
        done["card"] = write_model_card(staging, result, run.command, done["evaluation"],
                                        str(dense_dir) if dense_dir else None, shown=out)

    try:
        result = _fit(run, work, calibration, timings)
        with phase(timings, "export", resolve_device(run.device)):
            save_compressed(run.model_dir, result, out, finish=finish)   # staged beside OUT, swapped in whole
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if dense_dir is not None:
        export_dense(run.model_dir, result, dense_dir)
    evaluation, card = done["evaluation"], out / done["card"].name
    log.info("compressed %s into %s%s", run.model_dir, out, f" (dense: {dense_dir})" if dense_dir else "")
    return {"out": out, "dense": dense_dir, "result": result, "evaluation": evaluation, "card": card,
            "timings": timings}
