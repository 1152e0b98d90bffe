"""Files shipped with the package: the embedded default model (a small Qwen2-MoE trained on Python's docs)."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = ASSETS_DIR / "globe-tiny-moe"
