"""Calibration statistics: hooks leave the forward unchanged, sums are the right second moments, safetensors
round trip, clear errors for missing/foreign files."""
from __future__ import annotations

import torch
import pytest
from safetensors.torch import save_file

from globe.calibration import collect_stats, load_stats, save_stats
from globe.errors import ArtifactError
from globe.io import experts_modules
from tests.helpers.hooks import expert_inputs
from tests.helpers.tiny_models import TINY


def tokens(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed))


def test_hooks_leave_the_forward_unchanged_and_are_removed(tiny_model):
    model = tiny_model("qwen2_moe")
    ids = tokens()
    before = model(input_ids=ids[None]).logits
    collect_stats(model, ids, window=16)
    after = model(input_ids=ids[None]).logits
    assert torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in experts_modules(model).values())


def test_sums_are_the_routed_second_moments(tiny_model):
    model = tiny_model("qwen2_moe")
    ids = tokens(48, seed=1)
    with expert_inputs(model) as captured:
        stats = collect_stats(model, ids, window=16)
    assert stats.layers == sorted(captured) and stats.tokens == 48
    for pos, layer in enumerate(stats.layers):
        x = torch.cat([c[0] for c in captured[layer]]).double()                   # [T, d]
        index = torch.cat([c[1] for c in captured[layer]])                         # [T, k]
        assert torch.allclose(stats.hidden[pos], x.T @ x)
        assert torch.equal(stats.counts[pos], torch.bincount(index.flatten(), minlength=TINY.num_experts))
        # every token is routed to top_k experts: the per-expert sums add up to top_k times the layer sum
        assert torch.allclose(stats.hidden_expert[pos].sum(0), TINY.top_k * stats.hidden[pos])
        module = experts_modules(model)[layer]
        e = int(index[0, 0])
        xe = x[(index == e).any(1)].float()
        gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
        h = (module.act_fn(gate) * up).double()
        assert torch.allclose(stats.intermediate_expert[pos, e], h.T @ h, rtol=1e-5, atol=1e-6)
        # channel sensitivities (SiLU: act' = s (1 + g (1 - s)), s = sigmoid(g)), times ||D_:,j||^2
        s = torch.sigmoid(gate)
        out_sq = module.down_proj[e].square().sum(0).double()
        slope = s * (1 + gate * (1 - s))
        assert torch.allclose(stats.gate_channels[pos, e], (slope * up).double().square().sum(0) * out_sq, rtol=1e-4)
        assert torch.allclose(stats.up_channels[pos, e], (gate * s).double().square().sum(0) * out_sq, rtol=1e-4)


def test_round_trip_and_layer_only(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    stats = collect_stats(model, tokens(), window=16, info={"text": "x.txt"})
    path = save_stats(stats, tmp_path / "s.safetensors")
    back = load_stats(path)
    assert back.layers == stats.layers and back.tokens == stats.tokens and back.info["text"] == "x.txt"
    for name in ("hidden", "counts", "hidden_expert", "intermediate_expert", "gate_channels", "up_channels"):
        assert torch.allclose(getattr(back, name).double(), getattr(stats, name).double(), rtol=1e-6)
    small = collect_stats(model, tokens(), window=16, per_expert=False)
    assert small.hidden_expert is None and torch.allclose(small.hidden, stats.hidden)
    assert not load_stats(save_stats(small, tmp_path / "l.safetensors")).per_expert


def test_missing_or_foreign_files_raise(tmp_path):
    with pytest.raises(ArtifactError, match="globe calibrate"):
        load_stats(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArtifactError, match="not a GloBE activation statistics"):
        load_stats(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_stats(tmp_path / "bad.safetensors")
