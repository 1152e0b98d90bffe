"""Hydra entry point of a fit: `python -m globe.fit_banks [overrides]` (globe.fit_banks is its alias module), the
same job as `globe fit`.

    python -m globe.fit_banks out=runs/a                                  # embedded model, default config
    python -m globe.fit_banks model=/path/to/ckpt bank.m=256 sparsity.target_support=12 out=runs/b
    python -m globe.fit_banks model=tiny bank.m=8 train.am_iters=2 wandb.mode=offline export.dir=runs/b/hf
    python -m globe.fit_banks --cfg job                                   # print the composed config

Config groups model, bank, sparsity, train, activation, cache, export, wandb are the dataclasses of globe.fit.config and
globe.run.config registered as structured configs (one source of defaults). `model=tiny` is the embedded model;
`model=PATH_OR_HUB_ID` (anything that is not a registered option) sets model.path. The composed RunConfig goes
straight to the run layer (globe.run.fit.run_fit, then globe.run.export.run_export when export.dir is set), the
code `globe fit` / `globe export` run, so both write the same OUT/banks.safetensors, globe_config.json and
metrics.jsonl.
Hydra's working-directory change and its output/log directories are switched off: nothing else is written.
Inputs before work, as in `globe`: every number and input path of the composed config is checked by the checks of
globe.cli.inputs (`INPUTS`: config key -> the `globe fit` option of the same meaning), and the outputs (`out`,
`export.dir`) by globe.core.outputs, before the model is read; a refusal is one line naming the config key.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from globe.cli.inputs import Count, Fraction, Positive, checker
from globe.core import outputs
from globe.errors import GlobeError
from globe.fit.config import ActivationConfig, BankConfig, NonlinearConfig, SparsityConfig, TrainConfig
from globe.io.hub import resolve_model_dir
from globe.run.config import CacheConfig, ExportConfig, ModelConfig, RunConfig, WandbConfig
from globe.run.export import ExportRun, export_message, run_export
from globe.run.fit import FitRun, fit_summary, format_fit_summary, run_fit

log = logging.getLogger(__name__)
CONFIG_NAME = "fit_banks"
GROUPS = {"model": ModelConfig, "bank": BankConfig, "sparsity": SparsityConfig, "train": TrainConfig,
          "activation": ActivationConfig, "nonlinear": NonlinearConfig, "cache": CacheConfig, "export": ExportConfig,
          "wandb": WandbConfig}
MODEL_OPTIONS = ("tiny",)
# Keep Hydra from changing directory or writing .hydra/ and log files.
HYDRA_QUIET = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra.job.chdir=False",
               "hydra/job_logging=none", "hydra/hydra_logging=none"]


@dataclass
class FitBanksConfig(RunConfig):
    """RunConfig plus the Hydra defaults list selecting one option per group."""

    defaults: list[Any] = field(default_factory=lambda: [{"model": "tiny"}, *({g: "default"} for g in GROUPS
                                                                               if g != "model"), "_self_"])


def register_configs() -> None:
    """Register the primary config and one option per group (`default`; model also has `tiny`) in ConfigStore."""
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    cs.store(name=CONFIG_NAME, node=FitBanksConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name="tiny" if group == "model" else "default", node=node)


def rewrite_model_override(argv: list[str]) -> list[str]:
    """`model=PATH` (not a registered option) -> `model.path=PATH`, so a checkpoint dir or hub id can be given."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"model.path={value}" if key == "model" and sep and value not in MODEL_OPTIONS else arg)
    return out


def to_run_config(cfg) -> RunConfig:
    """The composed DictConfig as a RunConfig (families back to a tuple, as FitConfig stores them)."""
    from omegaconf import OmegaConf
    run = OmegaConf.to_object(cfg)
    run.bank.families = tuple(run.bank.families)
    return run


def compose_run_config(overrides: list[str] | None = None) -> RunConfig:
    """RunConfig composed from Hydra overrides without running anything (for tests and notebooks)."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    register_configs()
    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        return to_run_config(compose(config_name=CONFIG_NAME, overrides=rewrite_model_override(overrides or [])))


# config key -> the `globe fit` option (argparse dest) whose check of globe.cli.inputs it gets
INPUTS = {"bank.m": "m", "bank.r": "r", "bank.budget": "budget", "sparsity.target_support": "target_support",
          "train.am_iters": "am_iters", "train.varpro_steps": "varpro_steps", "train.cycles": "cycles",
          "train.refine_steps": "refine_steps", "train.seed": "seed", "train.checkpoint_every": "checkpoint_every",
          "activation.steps": "activation_steps", "cache.size": "cache_size", "cache.warmup_tokens": "warmup_tokens",
          "model.path": "model_dir", "activation.stats": "calibration"}
NUMBER_CHECKS = (Count, Fraction, Positive)


def check_run_inputs(run_cfg: RunConfig) -> None:
    """Every input of the composed config checked before any work (numbers first, then paths), then the outputs
    (never an input, not a file, not holding files without overwrite=true); GlobeError naming the config key."""
    checks = [(key, operator.attrgetter(key)(run_cfg), checker("fit", dest)) for key, dest in INPUTS.items()]
    checks = [(key, value, check) for key, value, check in checks if value is not None]
    for key, value, check in sorted(checks, key=lambda c: not isinstance(c[2], NUMBER_CHECKS)):
        if isinstance(check, (Count, Fraction)):
            check = dataclasses.replace(check, key="")        # the key is the flag here: named once
        check(value, key)
    model, out, export = Path(run_cfg.model.path), Path(run_cfg.out), run_cfg.export.dir
    outputs.check_not_an_input(out, [model, run_cfg.activation.stats], "out=DIR")
    if export:
        outputs.check_not_an_input(export, [model], "export.dir=DIR")
        outputs.check_apart({"out": out, "export.dir": export})
        if Path(export).exists():                              # never created here: the export claims it
            outputs.check_output_dir(export, run_cfg.overwrite, what="export", flag="export.dir=DIR")


def run(run_cfg: RunConfig) -> int:
    """Fit (and export) through the run layer, as `globe fit` (and `globe export`) do; prints what they print."""
    check_run_inputs(run_cfg)
    model_dir = str(resolve_model_dir(run_cfg.model.path))
    fit = FitRun(model_dir=model_dir, out=run_cfg.out, config=run_cfg.fit_config(), resume=run_cfg.resume,
                 overwrite=run_cfg.overwrite, wandb=run_cfg.wandb)
    result = run_fit(fit)
    if result is None:                                     # not rank 0 of a distributed fit
        return 0
    print(format_fit_summary(fit_summary(result), fit.out))
    if run_cfg.export.dir:
        export = ExportRun(artifact=run_cfg.out, out=run_cfg.export.dir, model=model_dir, dense=run_cfg.export.dense,
                           max_shard_size=run_cfg.export.max_shard_size, overwrite=run_cfg.overwrite)
        print(export_message(export, run_export(export)))
    return 0


def main(argv: list[str] | None = None) -> int:
    import hydra
    register_configs()
    status = {"code": 0}

    @hydra.main(version_base=None, config_name=CONFIG_NAME)
    def task(cfg) -> None:
        run_cfg = to_run_config(cfg)
        logging.basicConfig(level=getattr(logging, run_cfg.log_level), datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            status["code"] = run(run_cfg)
        except GlobeError as exc:
            print(f"globe.fit_banks: error: {exc}", file=sys.stderr)
            status["code"] = 2

    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *rewrite_model_override(args), *HYDRA_QUIET]
    task()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
