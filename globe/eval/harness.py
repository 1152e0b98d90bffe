"""Zero-shot evaluation with EleutherAI's lm-evaluation-harness (optional extra: pip install 'globe-moe[eval]').

    manager = prepare_tasks(["my_task"], task_dir="tasks/")                  # checked before any model load
    results = run_tasks(model, tokenizer, ["my_task"], manager=manager)      # model: original, patched or exported

The in-memory model is wrapped in lm-eval's HFLM (pretrained=model object), so a GloBE-patched model is evaluated
as it runs, without exporting. Everything runs offline: Hugging Face hub and datasets access is switched off for
the run (the HF_*_OFFLINE variables and the already imported libraries' flags), and a task whose data would have
to be downloaded from the hub (e.g. the built-in hellaswag, unless it is in the local cache) is refused before
lm-eval is called. Tasks must read local data, e.g. a YAML task with `dataset_path: json` and
`dataset_kwargs: {data_files: {test: /abs/path.jsonl}}` in task_dir. Each metric comes with its standard error
(`acc,none` and `acc_stderr,none`) where lm-eval computes one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from globe.errors import ConfigError

log = logging.getLogger(__name__)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BOOTSTRAP_ITERS = 1000          # > 0 so lm-eval reports stderrs: closed-form for acc (mean), bootstrap for the rest
LOCAL_TASK_HINT = ("give a local task instead: --task-dir DIR holding a YAML task that reads local data "
                   "(dataset_path: json, dataset_kwargs: {data_files: {test: /abs/path.jsonl}})")


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval is not installed: pip install 'globe-moe[eval]' (or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def _leaf_configs(index: dict, name: str, seen: set[str]) -> Iterator[tuple[str, dict]]:
    """(task name, indexed config) of every task that `name` (task, group or tag of the index) runs."""
    entry = index.get(name)
    if entry is None or name in seen:
        return
    seen.add(name)
    kind = entry.kind.name
    if kind == "TAG":
        for task in sorted(entry.tags):
            yield from _leaf_configs(index, task, seen)
    elif kind == "GROUP":
        children = (entry.cfg or {}).get("task") or []
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, str):
                yield from _leaf_configs(index, child, seen)
            elif isinstance(child, dict) and isinstance(child.get("task"), str):
                base = index.get(child["task"])                          # an inline override of a known task
                yield child["task"], {**((base.cfg or {}) if base is not None else {}), **child}
    else:
        yield name, entry.cfg or {}


def _packaged_loaders() -> set[str]:
    """datasets' builtin file loaders (json, csv, parquet, ...): they read data_files, not the hub."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:
        return {"json", "csv", "parquet", "text", "arrow", "pandas"}


def _in_local_cache(repo: str) -> bool:
    """Whether hub dataset `repo` was downloaded before (the hub cache or the datasets cache holds it)."""
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants
    except ImportError:
        return False
    return ((Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir()
            or (Path(ds_config.HF_DATASETS_CACHE) / repo.replace("/", "___")).is_dir())


def hub_download(cfg: dict[str, Any]) -> str | None:
    """What a task config would have to download (a hub dataset or a remote data file), None when its data is
    local: a local directory, a builtin file loader on local data_files, a custom dataset, or a cached dataset."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or cfg.get("custom_dataset") or Path(path).expanduser().exists():
        return None
    if path in _packaged_loaders():
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
        files = files.values() if isinstance(files, dict) else [files]
        flat = [f for group in files for f in ([group] if isinstance(group, str) else group)]
        return next((f for f in flat if isinstance(f, str) and "://" in f), None)
    return None if _in_local_cache(path) else path


def prepare_tasks(tasks: list[str], task_dir: str | Path | None = None, builtin_tasks: bool = False):
    """Index the task YAMLs (only task_dir's unless builtin_tasks or no task_dir) and check that every task is
    known and reads local data; returns lm-eval's TaskManager. Raises ConfigError, before any download."""
    _, _, TaskManager = _harness()
    if not tasks:
        raise ConfigError("no lm-eval task given: pass --tasks t1,t2")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise ConfigError(f"task directory {task_dir} not found")
    manager = TaskManager(include_path=str(task_dir) if task_dir else None,
                          include_defaults=builtin_tasks or task_dir is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}" + (f" in {task_dir}" if task_dir else "")
                          + ": check --tasks / --task-dir")
    for requested in tasks:
        for task, cfg in _leaf_configs(manager.task_index, requested, set()):
            remote = hub_download(cfg)
            if remote is not None:
                via = "" if task == requested else f" (in {requested!r})"
                raise ConfigError(f"lm-eval task {task!r}{via} needs a dataset download ({remote}) and globe eval "
                                  f"runs offline: {LOCAL_TASK_HINT}")
    return manager


def _quiet_git_hash() -> str | None:
    """lm-eval's commit-hash lookup without git's "fatal: not a git repository" on stderr."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


@contextlib.contextmanager
def _swapped(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def offline_and_quiet() -> Iterator[None]:
    """For one lm-eval run: hub and datasets offline (also in the libraries that read the variables at import)
    and lm-eval's git lookup silent; everything is restored afterwards."""
    import lm_eval.evaluator
    from datasets import config as ds_config
    from huggingface_hub import constants
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_swapped(constants, "HF_HUB_OFFLINE", True))
            for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                stack.enter_context(_swapped(ds_config, flag, True))
            stack.enter_context(_swapped(lm_eval.evaluator, "get_git_commit_hash", _quiet_git_hash))
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], task_dir: str | Path | None = None,
              builtin_tasks: bool = False, batch_size: int = 1, limit: int | float | None = None,
              num_fewshot: int | None = None, seed: int = 0, bootstrap_iters: int = BOOTSTRAP_ITERS,
              manager=None) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model`; {"results": {task: {metric: value}}, "n_samples": {...}, "versions": {...}}.

    task_dir: directory of task YAMLs (only it is indexed unless builtin_tasks). limit: examples per task.
    Metrics are lm-eval's keys, e.g. "acc,none" with its "acc_stderr,none" (bootstrap_iters=0: no stderrs).
    manager: the TaskManager of prepare_tasks(tasks, ...) when the tasks were checked already.
    """
    lm_eval, HFLM, _ = _harness()
    manager = manager if manager is not None else prepare_tasks(tasks, task_dir, builtin_tasks)
    model.eval()
    device = next(model.parameters()).device
    with offline_and_quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v != "N/A"}
               for task, metrics in out["results"].items()}
    log.info("lm-eval: %s", results)
    return {"results": results, "n_samples": out.get("n-samples", {}), "versions": out.get("versions", {})}


def metric_lines(metrics: dict[str, Any]) -> list[str]:
    """"acc 0.7500 ± 0.2500" per metric of one task's results (without "± ..." where no stderr was computed)."""
    shown = []
    for key, value in metrics.items():
        if not isinstance(value, float) or "_stderr," in key:
            continue
        name, _, filt = key.partition(",")
        stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
        shown.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else ""))
    return shown
