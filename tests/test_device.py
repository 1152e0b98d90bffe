"""globe.device: device resolution, the checkpoint's compute dtype, peak memory."""
from __future__ import annotations

import json

import pytest
import torch

from globe.assets import DEFAULT_MODEL_DIR
from globe.device import checkpoint_dtype, compute_dtype, peak_memory_mb, resolve_device, supports_dtype


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_dtype_comes_from_the_checkpoint(tmp_path):
    assert checkpoint_dtype(DEFAULT_MODEL_DIR) == torch.bfloat16          # the embedded model is stored in bf16
    cpu = torch.device("cpu")
    assert supports_dtype(cpu, torch.bfloat16)
    assert compute_dtype(DEFAULT_MODEL_DIR, cpu) == torch.bfloat16
    assert compute_dtype(DEFAULT_MODEL_DIR, cpu, "float32") == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert checkpoint_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert compute_dtype(tmp_path, cpu) == "auto"                           # transformers decides


def test_peak_memory_grows_with_an_allocation():
    before = peak_memory_mb("cpu")
    block = torch.ones(64 * 2**20 // 4)                                     # 64 MiB, touched
    assert peak_memory_mb("cpu") >= before and peak_memory_mb("cpu") >= 64
    del block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_peak_memory():
    block = torch.ones(2**20, device="cuda")                                # 4 MiB
    assert peak_memory_mb("cuda") >= 4 and block.is_cuda
