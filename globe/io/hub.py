"""Model directories given as a local path or a Hugging Face hub id (`org/name`), resolved to a local directory.

    resolve_model_dir("path/to/checkpoint")     # returned as is
    resolve_model_dir("Qwen/Qwen1.5-MoE-A2.7B")  # snapshot_download where a network exists, else ModelDirError
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from globe.errors import ModelDirError

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a checkpoint needs: config, weights (safetensors only), tokenizer and generation files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/")) and ".." not in name


def resolve_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory for `name`: the path itself when it exists (or is not a hub id), otherwise
    a hub snapshot (safetensors and JSON only) downloaded with huggingface_hub."""
    path = Path(name)
    if path.exists() or not looks_like_hub_id(str(name)):
        return path
    try:
        from huggingface_hub import snapshot_download
        log.info("%s is not a local directory: downloading it from the Hugging Face hub", name)
        return Path(snapshot_download(repo_id=str(name), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        raise ModelDirError(f"{name} is not a local directory and could not be downloaded from the hub "
                            f"(no network? {type(exc).__name__}): pass a local checkpoint directory") from None
