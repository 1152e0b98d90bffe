"""Tests of globe.io.lazy: LazyExperts reads exactly what the eager reader returns, only when indexed."""
from __future__ import annotations

import re

import pytest
import torch

from globe.errors import NumericalError
from globe.io import open_checkpoint
from globe.io.lazy import LazyExperts
from tests.helpers.tiny_models import TINY_ARCHS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lazy_equals_eager(arch: str, layout: str, shards: int, dtype: torch.dtype, tiny_checkpoint) -> None:
    with open_checkpoint(tiny_checkpoint(arch, layout=layout, shards=shards, dtype=dtype)) as reader:
        for family in ("gate", "up", "down"):
            eager, lazy = reader.read_family(family), reader.read_family(family, lazy=True)
            assert isinstance(lazy.weights, LazyExperts)
            assert lazy.weights.shape == eager.weights.shape and lazy.weights.dtype == eager.weights.dtype
            assert torch.equal(lazy.weights.to_tensor(), eager.weights), family
            assert torch.equal(lazy.ids, eager.ids)


def test_lazy_indexing(tiny_checkpoint) -> None:
    reader = open_checkpoint(tiny_checkpoint("qwen2_moe", shards=2))
    eager, lazy = reader.read_family("up").weights, reader.read_family("up", lazy=True).weights
    assert torch.equal(lazy[2:5], eager[2:5]) and torch.equal(lazy[3], eager[3]) and torch.equal(lazy[-1], eager[-1])
    index = torch.tensor([[5, 0], [1, 1]])
    assert torch.equal(lazy[index], eager[index]) and torch.equal(lazy[[4, 2]], eager[[4, 2]])
    assert len(lazy) == eager.shape[0]


def test_lazy_nan_names_the_tensor(mutable_checkpoint) -> None:
    from safetensors.torch import load_file, save_file
    path = mutable_checkpoint("qwen2_moe")
    name = "model.layers.2.mlp.experts.1.gate_proj.weight"
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name].view(-1)[3] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    lazy = open_checkpoint(path).read_family("gate", lazy=True).weights     # nothing read yet: no error
    lazy[:1]
    with pytest.raises(NumericalError, match=rf"'{re.escape(name)}' holds 1 NaN/Inf"):
        lazy[:]
