"""load_for_eval: a compressed checkpoint loads in the dtype asked for (not silently in its stored one)."""
from __future__ import annotations

import pytest
import torch

from globe.export import save_compressed
from globe.run.load import ModelLoad, load_for_eval
from globe.runtime import globe_modules
from tests.helpers.fits import char_tokenizer, quick_fit


@pytest.mark.parametrize("dtype, want", [("float32", torch.float32), ("auto", torch.bfloat16)])
def test_compressed_checkpoint_loads_in_the_dtype_asked_for(tmp_path, tiny_checkpoint, dtype, want):
    path = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    out = save_compressed(path, quick_fit(path), tmp_path / "c")
    char_tokenizer(out)
    model, _ = load_for_eval(ModelLoad(str(out), dtype=dtype, mode="factored"))
    assert model.dtype == want and globe_modules(model)[0].bank["gate"].dtype == want
