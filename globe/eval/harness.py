"""Zero-shot evaluation with EleutherAI's lm-evaluation-harness (optional extra: pip install 'globe-moe[eval]').

    results = run_tasks(model, tokenizer, ["my_task"], task_dir="tasks/")     # model: original, patched or exported

The in-memory model is wrapped in lm-eval's HFLM (pretrained=model object), so a GloBE-patched model is evaluated
as it runs, without exporting. Hugging Face hub and datasets access is switched off (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE): tasks must read local data, e.g. a YAML task with `dataset_path: json` and
`dataset_kwargs: {data_files: {test: /abs/path.jsonl}}` in task_dir.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from globe.errors import ConfigError

log = logging.getLogger(__name__)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval is not installed: pip install 'globe-moe[eval]' (or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], task_dir: str | Path | None = None,
              builtin_tasks: bool = False, batch_size: int = 1, limit: int | float | None = None,
              num_fewshot: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model`; {"results": {task: {metric: value}}, "n_samples": {...}, "versions": {...}}.

    task_dir: directory of task YAMLs (only it is indexed unless builtin_tasks). limit: examples per task.
    """
    lm_eval, HFLM, TaskManager = _harness()
    if not tasks:
        raise ConfigError("no lm-eval task given: pass --tasks t1,t2")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise ConfigError(f"task directory {task_dir} not found")
    os.environ.update(OFFLINE)
    manager = TaskManager(include_path=str(task_dir) if task_dir else None,
                          include_defaults=builtin_tasks or task_dir is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}" + (f" in {task_dir}" if task_dir else "")
                          + ": check --tasks / --task-dir")
    model.eval()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v != "N/A"}
               for task, metrics in out["results"].items()}
    log.info("lm-eval: %s", results)
    return {"results": results, "n_samples": out.get("n-samples", {}), "versions": out.get("versions", {})}
