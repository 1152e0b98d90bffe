"""Routed samples: the first tokens routed to each expert, capped, their file round trip and its checks."""
from __future__ import annotations

import pytest
import torch

from globe.calibration import collect_stats
from globe.calibration.routed import cap_for, load_routed, save_routed
from globe.errors import ArtifactError
from tests.helpers.hooks import expert_inputs


def test_the_first_routed_tokens_of_each_expert_are_kept_up_to_the_cap(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, 64, (64,), generator=torch.Generator().manual_seed(0))
    with expert_inputs(model) as captured:
        stats = collect_stats(model, ids, window=16, routed=3)
    routed = stats.routed
    assert routed is not None and routed.inputs.shape[2] == 3
    assert torch.equal(routed.counts, stats.counts.clamp_max(3))
    for pos, layer in enumerate(routed.layers):
        x = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in captured[layer]])   # [T, d]
        index = torch.cat([c[1] for c in captured[layer]])                           # [T, k]
        weights = torch.cat([c[2] for c in captured[layer]])
        for e in range(routed.counts.shape[1]):
            token, slot = (index == e).nonzero(as_tuple=True)
            n = int(routed.counts[pos, e])
            assert torch.allclose(routed.inputs[pos, e, :n], x[token[:n]].float())
            assert torch.allclose(routed.weights[pos, e, :n], weights[token[:n], slot[:n]].float())
            assert not routed.inputs[pos, e, n:].any()
    back = load_routed(save_routed(routed, tmp_path / "routed.safetensors"))
    assert torch.equal(back.inputs, routed.inputs) and back.layers == routed.layers and back.info["activation"]
    assert collect_stats(model, ids, window=16).routed is None                      # off by default


def test_the_cap_bounds_the_memory_and_bad_files_fail_in_one_line(tmp_path):
    assert cap_for(256, 24, 60, 2048, 64) * 24 * 60 * 2049 * 4 <= 64 << 20
    assert cap_for(256, 2, 4, 8, 512) == 256
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="bad.safetensors"):
        load_routed(bad)
    with pytest.raises(ArtifactError, match="not found"):
        load_routed(tmp_path / "missing.safetensors")
