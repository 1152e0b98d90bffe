"""Fixtures of the round-three battery: one source model and its compressed checkpoint per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from globe.cli.main import main
from tests.helpers.fits import char_tokenizer
from tests.reliability.battery import QUICK


@pytest.fixture(scope="session")
def round3_base(tmp_path_factory, tiny_checkpoint) -> Path:
    """base/model (tiny qwen2_moe + character tokenizer) and base/comp (`globe compress` of it)."""
    base = tmp_path_factory.mktemp("round3")
    shutil.copytree(tiny_checkpoint("qwen2_moe"), base / "model")
    char_tokenizer(base / "model")
    assert main(["--log-level", "ERROR", "compress", str(base / "model"), "-o", str(base / "comp"), *QUICK,
                 "--expert-steps", "0"]) == 0
    return base
