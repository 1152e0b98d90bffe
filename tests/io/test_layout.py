"""globe.io.layout: the experts layouts of the registry. A second layout (gpt-oss style interleaved gate/up rows)
is one ArchSpec field away: runtime, calibration, dense export and footprint read a model through it."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from globe.calibration import collect_stats
from globe.errors import ArtifactError, ConfigError
from globe.eval.footprint import routed_footprint
from globe.export import dense_state_dict
from globe.io.arch import REGISTRY
from globe.io.layout import EXPERTS_LAYOUTS, FusedGateUp, InterleavedGateUp, get_layout, register_layout
from globe.io.model import experts_modules, model_arch, model_shape
from globe.runtime import apply_globe
from tests.helpers.fits import exact_result


class InterleavedExperts(nn.Module):
    """A fake experts module storing gate and up rows interleaved (gate = even rows of gate_up_proj [E, 2p, d]),
    computing what transformers' fused module computes (a loop over experts: small, slow, plain)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        p = fused.gate_up_proj.shape[1] // 2
        gate, up = fused.gate_up_proj.data[:, :p], fused.gate_up_proj.data[:, p:]
        self.gate_up_proj = nn.Parameter(torch.stack([gate, up], dim=2).flatten(1, 2).clone())   # [E, 2p, d]
        self.down_proj = nn.Parameter(fused.down_proj.data.clone())                                # [E, d, p]
        self.act_fn = fused.act_fn
        self.num_experts = fused.gate_up_proj.shape[0]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if token.numel():
                gate_up = hidden_states[token] @ self.gate_up_proj[e].T                           # [n, 2p]
                h = self.act_fn(gate_up[:, 0::2]) * gate_up[:, 1::2]
                out.index_add_(0, token, (h @ self.down_proj[e].T) * top_k_weights[token, slot, None])
        return out


def interleaved_copy(original: nn.Module, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """A copy of a qwen2_moe model with interleaved experts; the registry entry of qwen2_moe switched over to them
    (the one change an architecture with this layout needs)."""
    model = copy.deepcopy(original)
    spec, _ = model_arch(model)
    for layer, module in experts_modules(model).items():
        model.set_submodule(spec.experts_path(layer), InterleavedExperts(module))
    monkeypatch.setitem(REGISTRY, "qwen2_moe", dataclasses.replace(spec, experts_layout="interleaved_gate_up"))
    return model


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_layouts_read_and_write_the_same_weights():
    e, p, d = 3, 4, 5
    weights = {"gate": torch.randn(e, p, d), "up": torch.randn(e, p, d), "down": torch.randn(e, d, p)}
    for layout in (FusedGateUp(), InterleavedGateUp()):
        module = nn.Module()
        for name, tensor in layout.state(weights).items():
            module.register_parameter(name, nn.Parameter(tensor))
        module.act_fn = nn.SiLU()
        assert layout.dims(module) == (e, p, d) and layout.is_original(module)
        for family, w in weights.items():
            assert torch.equal(layout.weight(module, family), w), (layout.name, family)
        new = {"gate": torch.randn(e, p, d)}
        layout.set_weights(module, new)
        assert torch.equal(layout.weight(module, "gate"), new["gate"])
        assert torch.equal(layout.weight(module, "up"), weights["up"])
    fused, inter = FusedGateUp().state(weights), InterleavedGateUp().state(weights)
    assert torch.equal(fused["gate_up_proj"][:, :p], weights["gate"])
    assert torch.equal(inter["gate_up_proj"][:, 0::2], weights["gate"]) and not torch.equal(fused["gate_up_proj"],
                                                                                           inter["gate_up_proj"])


def test_the_registry_names_layouts_and_refuses_unknown_or_taken_names():
    assert get_layout("fused_gate_up") is EXPERTS_LAYOUTS["fused_gate_up"]
    assert all(spec.layout.name == "fused_gate_up" for spec in REGISTRY.values())
    with pytest.raises(ConfigError, match="unknown experts layout 'nope'"):
        get_layout("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_layout(FusedGateUp())
    with pytest.raises(ArtifactError, match="is not a fused experts module"):
        FusedGateUp().check(nn.Linear(2, 2), "model.layers.0.mlp.experts")


def test_a_model_with_interleaved_experts_runs_calibrates_and_exports_like_the_fused_one(tiny_model, monkeypatch):
    original = tiny_model("qwen2_moe")
    result = exact_result(original)
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    spec, _ = model_arch(original)
    fused_shape = model_shape(original)
    prefix, p = spec.experts_path(fused_shape.moe_layers[0]), fused_shape.p
    want = {"logits": _logits(original), "stats": collect_stats(original, ids, window=12),
            "state": dense_state_dict(original, result), "footprint": routed_footprint(original),
            **{mode: _logits(apply_globe(copy.deepcopy(original), result, mode=mode)) for mode in ("factored", "dense")}}

    model = interleaved_copy(original, monkeypatch)
    assert model_arch(model)[0].layout.name == "interleaved_gate_up"
    torch.testing.assert_close(_logits(model), want["logits"], rtol=1e-5, atol=1e-5)     # the fake is faithful
    shape = model_shape(model)
    assert (shape.num_experts, shape.p, shape.d) == (fused_shape.num_experts, fused_shape.p, fused_shape.d)
    for mode in ("factored", "dense"):                       # the artifact applies through the layout
        torch.testing.assert_close(_logits(apply_globe(copy.deepcopy(model), result, mode=mode)), want[mode],
                                   rtol=1e-5, atol=1e-5)
    got = collect_stats(model, ids, window=12)
    for name in ("hidden", "counts", "intermediate_expert", "gate_channels", "up_channels"):
        torch.testing.assert_close(getattr(got, name), getattr(want["stats"], name), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    state = dense_state_dict(model, result)                  # written back in the interleaved layout
    assert torch.equal(state[f"{prefix}.gate_up_proj"][:, 0::2], want["state"][f"{prefix}.gate_up_proj"][:, :p])
    assert torch.equal(state[f"{prefix}.gate_up_proj"][:, 1::2], want["state"][f"{prefix}.gate_up_proj"][:, p:])
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(state)
    torch.testing.assert_close(_logits(reloaded), want["dense"], rtol=1e-5, atol=1e-5)
    assert routed_footprint(model)["routed_params_before"] == want["footprint"]["routed_params_before"]
