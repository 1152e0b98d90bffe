"""Shared pytest fixtures: tiny MoE models and checkpoints, built once per session and cached.

    def test_x(tiny_checkpoint, tiny_model):
        path = tiny_checkpoint("qwen2_moe", layout="fused", shards=2)   # read-only, shared across tests
        model = tiny_model("qwen2_moe")                                  # the model that checkpoint was saved from

    def test_y(mutable_checkpoint):
        path = mutable_checkpoint("mixtral")                             # a private copy a test may damage

Add further fixtures below; keep them generic (any architecture in tests.helpers.tiny_models.TINY_ARCHS).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.tiny_models import make_tiny_checkpoint, make_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (pyproject's addopts run `-n 2`) each worker computes on one thread, and so do the
    processes it starts, so that the workers do not oversubscribe the cores; a single process (`-n 0`) is left as is."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="device of the tests that run a fit or a model (fixture `device`): cpu (default), cuda, mps")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """torch.device chosen with `pytest --device` (tests that fit or run a model put their work there)."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Any]:
    """Factory (arch, seed=0, dtype=float32) -> cached tiny transformers model. Do not modify it."""
    cache: dict[tuple[str, int, torch.dtype], Any] = {}

    def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
        key = (arch, seed, dtype)
        if key not in cache:
            cache[key] = make_tiny_model(arch, seed=seed, dtype=dtype)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Any]) -> Callable[..., Path]:
    """Factory (arch, layout="per_expert", shards=1, dtype=float32, seed=0) -> cached checkpoint dir (read-only)."""
    cache: dict[tuple[str, str, int, torch.dtype, int], Path] = {}

    def build(arch: str, layout: str = "per_expert", shards: int = 1, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> Path:
        key = (arch, layout, shards, dtype, seed)
        if key not in cache:
            name = f"{arch}-{layout}-{shards}-{str(dtype).removeprefix('torch.')}-{seed}"
            out = tmp_path_factory.mktemp(name)
            cache[key] = make_tiny_checkpoint(arch, out, layout=layout, shards=shards,
                                              model=tiny_model(arch, seed=seed, dtype=dtype))
        return cache[key]

    return build


@pytest.fixture
def mutable_checkpoint(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """Factory with tiny_checkpoint's arguments -> a private copy under tmp_path that the test may modify."""
    def copy(arch: str, **kwargs: Any) -> Path:
        dest = tmp_path / f"{arch}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_checkpoint(arch, **kwargs), dest)
        return dest

    return copy


@pytest.fixture
def bench_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`globe bench` evaluates each variant in this process instead of a fresh one (each fresh process imports
    torch and transformers again: seconds per variant). For tests of what bench reports; the isolated path itself
    is tested in tests/cli/test_bench.py::test_bench_compares_original_and_modes."""
    import globe.run.evaluate as evaluate

    def here(spec: Any, text: Any, original: str | None = None, compare: bool = True) -> dict:
        return evaluate.evaluate_model(spec, text, original, compare)
    monkeypatch.setattr(evaluate, "evaluate_isolated", here)
