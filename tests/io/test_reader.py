"""Tests of globe.io.reader: expert stacks read back bit-exactly from every architecture, layout and sharding."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from globe.errors import CheckpointError, ConfigError
from globe.io import CheckpointReader, Inventory, open_checkpoint
from tests.helpers.tiny_models import TINY, TINY_ARCHS, TINY_DENSE_LAYERS, reference_experts

FAMILIES = ("gate", "up", "down")


def _moe_layers(arch: str) -> list[int]:
    return [layer for layer in range(TINY.num_layers) if layer not in TINY_DENSE_LAYERS[arch]]


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_read_family_equals_model_params(arch: str, layout: str, shards: int, tiny_model, tiny_checkpoint) -> None:
    reference = reference_experts(tiny_model(arch).state_dict())
    with open_checkpoint(tiny_checkpoint(arch, layout=layout, shards=shards)) as reader:
        assert reader.layout == layout
        assert (len(reader.inventory().shards) > 1) == (shards > 1)
        for family in FAMILIES:
            stack = reader.read_family(family)
            assert stack.family == family
            assert torch.equal(stack.weights, reference[family].weights), family
            assert torch.equal(stack.ids, reference[family].ids), family


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ids_and_shapes_skip_dense_layers(arch: str, tiny_checkpoint) -> None:
    reader = open_checkpoint(tiny_checkpoint(arch))
    moe = _moe_layers(arch)
    gate, down = reader.read_family("gate"), reader.read_family("down")
    n = len(moe) * TINY.num_experts
    assert gate.weights.shape == (n, TINY.p, TINY.d) and down.weights.shape == (n, TINY.d, TINY.p)
    expected = torch.tensor([(layer, e) for layer in moe for e in range(TINY.num_experts)])
    assert torch.equal(gate.ids, expected) and gate.ids.dtype == torch.long
    assert not set(gate.ids[:, 0].tolist()) & set(TINY_DENSE_LAYERS[arch])


def _expected_groups(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, int]:
    """Untouched params per group from the in-memory state dict, by plain substring rules."""
    groups = {"shared_experts": 0, "shared_expert_gate": 0, "routers": 0, "dense_mlps": 0}
    for name, tensor in state_dict.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if ".shared_expert_gate." in name:
            groups["shared_expert_gate"] += tensor.numel()
        elif ".shared_expert." in name or ".shared_experts." in name:
            groups["shared_experts"] += tensor.numel()
        elif ".mlp.gate." in name:
            groups["routers"] += tensor.numel()
        elif ".mlp." in name and layer in TINY_DENSE_LAYERS[arch]:
            groups["dense_mlps"] += tensor.numel()
    return {g: n for g, n in groups.items() if n}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_inventory_counts(arch: str, layout: str, tiny_model, tiny_checkpoint) -> None:
    state_dict = tiny_model(arch).state_dict()
    inv = open_checkpoint(tiny_checkpoint(arch, layout=layout)).inventory()
    moe = _moe_layers(arch)
    assert (inv.model_type, inv.layout, inv.dtype) == (arch, layout, "float32")
    assert (inv.num_layers, inv.moe_layers, inv.dense_layers) == (TINY.num_layers, moe, TINY_DENSE_LAYERS[arch])
    assert (inv.num_experts, inv.top_k, inv.p, inv.d) == (TINY.num_experts, TINY.top_k, TINY.p, TINY.d)
    per_family = len(moe) * TINY.num_experts * TINY.p * TINY.d
    assert inv.params == {"gate": per_family, "up": per_family, "down": per_family}
    assert inv.routed_params == 3 * per_family
    assert inv.total_params == sum(t.numel() for t in state_dict.values())
    assert inv.total_params == inv.routed_params + sum(inv.untouched.values())
    expected = _expected_groups(state_dict, arch)
    assert {g: n for g, n in inv.untouched.items() if g in expected} == expected
    assert set(inv.untouched) - set(expected) == {"other"}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bf16_stays_bf16(arch: str, layout: str, tiny_model, tiny_checkpoint) -> None:
    reference = reference_experts(tiny_model(arch, dtype=torch.bfloat16).state_dict())
    reader = open_checkpoint(tiny_checkpoint(arch, layout=layout, dtype=torch.bfloat16))
    assert reader.inventory().dtype == "bfloat16"
    for family in ("gate", "down"):
        stack = reader.read_family(family)
        assert stack.weights.dtype == torch.bfloat16
        assert torch.equal(stack.weights, reference[family].weights)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_iter_layers_reads_only_that_layer(layout: str, tiny_checkpoint) -> None:
    reader = open_checkpoint(tiny_checkpoint("qwen2_moe", layout=layout))
    read: list[str] = []
    original_get, original_rows = reader.shards.get, reader.shards.get_rows
    reader.shards.get = lambda name: read.append(name) or original_get(name)
    reader.shards.get_rows = lambda name, a, b: read.append(name) or original_rows(name, a, b)
    layers = iter(reader.iter_layers("up"))
    layer, weights = next(layers)
    assert layer == 0 and weights.shape == (TINY.num_experts, TINY.p, TINY.d)
    assert read and all(name.startswith("model.layers.0.mlp.experts.") for name in read)
    read.clear()
    layer, weights = next(layers)
    assert layer == 2 and all(name.startswith("model.layers.2.mlp.experts.") for name in read)
    assert next(layers, None) is None


def test_read_family_layer_subset(tiny_model, tiny_checkpoint) -> None:
    reference = reference_experts(tiny_model("deepseek_v3").state_dict())["down"]
    stack = open_checkpoint(tiny_checkpoint("deepseek_v3")).read_family("down", layers=[2])
    keep = reference.ids[:, 0] == 2
    assert torch.equal(stack.weights, reference.weights[keep]) and torch.equal(stack.ids, reference.ids[keep])
    assert len(stack) == TINY.num_experts


def test_dense_layer_or_bad_family_rejected(tiny_checkpoint) -> None:
    reader = open_checkpoint(tiny_checkpoint("deepseek_v2"))
    with pytest.raises(ConfigError, match=r"layer 0 .* is not a MoE layer; MoE layers are \[1, 2\]"):
        reader.read_family("gate", layers=[0])
    with pytest.raises(ConfigError, match="unknown expert family 'gate_up'"):
        next(reader.iter_layers("gate_up"))


def test_tensor_and_group_of(tiny_model, tiny_checkpoint) -> None:
    reader = open_checkpoint(tiny_checkpoint("mixtral"))
    state_dict = tiny_model("mixtral").state_dict()
    assert torch.equal(reader.tensor("model.embed_tokens.weight"), state_dict["model.embed_tokens.weight"])
    assert torch.equal(reader.tensor("model.layers.1.block_sparse_moe.gate.weight"),
                       state_dict["model.layers.1.mlp.gate.weight"])
    assert reader.group_of("model.layers.1.block_sparse_moe.experts.3.w3.weight") == "routed"
    assert reader.group_of("model.layers.1.block_sparse_moe.gate.weight") == "routers"
    # hub layout: 3 tensors per expert instead of 2 fused tensors per layer
    assert len(reader.keys()) == len(state_dict) + TINY.num_layers * (3 * TINY.num_experts - 2)
    with pytest.raises(CheckpointError, match="'model.nope' is not in the checkpoint"):
        reader.tensor("model.nope")


def test_inventory_json_round_trip(tiny_checkpoint) -> None:
    inv = CheckpointReader(tiny_checkpoint("qwen3_moe", layout="fused", shards=2)).inventory()
    data = json.loads(json.dumps(inv.to_dict()))
    assert Inventory.from_dict(data) == inv
    assert data["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_reading_does_not_import_transformers(tiny_checkpoint) -> None:
    code = ("import sys; from globe.io import open_checkpoint; r = open_checkpoint(sys.argv[1]); "
            "r.read_family('gate'); assert 'transformers' not in sys.modules, 'transformers imported'")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint("olmoe"))], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
