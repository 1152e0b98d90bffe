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


def test_fit_accumulates_in_float32_where_float64_is_missing(monkeypatch):
    """MPS has no float64: with the accumulation dtype forced to float32 (as on MPS) a fit still runs, and every
    accumulator that would have been float64 is float32 (checked on the shared MOD normal equations)."""
    import globe.device as device_mod
    import globe.fit.solvers.am as am
    import globe.fit.engine as engine
    import globe.fit.solvers.mod as mod
    import globe.fit.engine.shape as shape
    import globe.fit.warm_starts.targets as targets
    import globe.fit.warm_starts.ts_pca as ts_pca
    from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
    from tests.helpers.planted import make_planted
    for module in (device_mod, am, shape, mod, targets, ts_pca):
        monkeypatch.setattr(module, "acc_dtype", lambda device: torch.float32)
    seen = []
    real = mod.ridge_cholesky
    monkeypatch.setattr(mod, "ridge_cholesky", lambda gram, ridge: seen.append(gram.dtype) or real(gram, ridge))
    planted = make_planted(n=24, seed=2)
    cfg = FitConfig(bank=BankConfig(m=8, r=8, init="ts_pca"), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=3, varpro_steps=3))
    fam = engine.fit_family(planted.weights, planted.ids, cfg)
    assert seen and set(seen) == {torch.float32}
    assert 0 <= fam.metrics["rel_err"] < 0.5 and torch.isfinite(fam.bank).all()
