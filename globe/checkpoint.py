"""Per-family fit checkpoints inside the output directory, for `globe fit --resume`.

OUT/.globe_checkpoint/<family>.safetensors holds a finished family (tensors + metrics and the fit config in the
header). A resumed run reuses every family whose stored config equals the current one and refits the rest.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from globe.artifact import atomic_write, build_family, family_tensors
from globe.fit.config import FitConfig
from globe.fit.result import FamilyFit

log = logging.getLogger(__name__)
CHECKPOINT_DIR = ".globe_checkpoint"


def _fingerprint(cfg: FitConfig, model_dir: str) -> str:
    return json.dumps({"config": cfg.to_dict(), "model_dir": str(Path(model_dir).resolve())}, sort_keys=True)


def save_family(out: Path, fam: FamilyFit, cfg: FitConfig, model_dir: str) -> None:
    meta = {"fingerprint": _fingerprint(cfg, model_dir), "phi": fam.phi,
            "metrics": json.dumps(fam.metrics, default=float), "history": json.dumps(fam.history, default=float)}
    tensors = family_tensors(fam)
    atomic_write(out / CHECKPOINT_DIR / f"{fam.family}.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_families(out: Path, cfg: FitConfig, model_dir: str) -> dict[str, FamilyFit]:
    """Families finished by an earlier run with the same config and model; others are ignored (with a log)."""
    found: dict[str, FamilyFit] = {}
    for family in cfg.bank.families:
        path = out / CHECKPOINT_DIR / f"{family}.safetensors"
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                t = {k.split(".", 1)[1]: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as exc:
            log.warning("ignoring unreadable checkpoint %s (%s): %s will be refitted", path, exc, family)
            continue
        if meta.get("fingerprint") != _fingerprint(cfg, model_dir):
            log.warning("checkpoint %s was made with another config or model: %s will be refitted", path, family)
            continue
        found[family] = build_family(family, t, meta["phi"], json.loads(meta["metrics"]), json.loads(meta["history"]))
    return found


def clear(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
