"""The budget-sweep format: the JSON `globe sweep` writes and `globe eval --plots DIR --sweep JSON` draws.

    {"format_version": FORMAT_VERSION, "model": {"model_dir", "name", "content_hash"}, "settings": {...},
     "families": {family: [one row per budget: {"budget", "dense_params", "svd": {"rank", "params", "rel_err"},
                                                "globe": [per warm start: "init", "m", "r", "params", "rel_err",
                                                          "median_support", "seconds"],
                                                "best_globe", "ratio_vs_svd", ...]}}
Rows may carry more keys (benchmarks/quality.py adds "mobe"). Documents without a version read as version 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from globe.core import outputs
from globe.core.files import atomic_write_text
from globe.errors import ArtifactError

FORMAT_VERSION = 1


def new_document(model_dir: str | Path, content_hash: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """An empty sweep document of the checkpoint `model_dir` (families are added per family)."""
    return {"format_version": FORMAT_VERSION,
            "model": {"model_dir": str(Path(model_dir).resolve()), "name": Path(model_dir).resolve().name,
                      "content_hash": content_hash},
            "settings": settings, "families": {}}


def write_sweep(path: str | Path, doc: dict[str, Any]) -> None:
    """The document as indented JSON, written atomically."""
    atomic_write_text(Path(path), outputs.json_text(doc, indent=1))


def read_sweep(path: str | Path) -> dict:
    """A sweep JSON (from `globe sweep` or benchmarks/quality.py); ArtifactError naming the file if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"sweep {path} does not exist: make one with `globe sweep MODEL_DIR -o {path}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"sweep {path} is not JSON ({exc}): make it again with `globe sweep`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("families"), dict):
        raise ArtifactError(f"sweep {path} has no \"families\": it is not a budget sweep (see `globe sweep --help`)")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(f"sweep {path} has format_version {version!r}; this globe reads 1..{FORMAT_VERSION}"
                            + (": upgrade globe" if isinstance(version, int) and version > FORMAT_VERSION else ""))
    return doc
