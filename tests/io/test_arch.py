"""Tests of globe.io.arch: registry lookup, MoE/dense layer rules, key templates checked against transformers."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from globe.errors import ConfigError, UnsupportedArchitectureError
from globe.io.arch import REGISTRY, get_arch, supported_model_types
from tests.helpers.tiny_models import TINY, TINY_ARCHS, TINY_DENSE_LAYERS


def test_registry_covers_every_tiny_arch() -> None:
    assert supported_model_types() == sorted(TINY_ARCHS)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_get_arch_by_model_type(model_type: str) -> None:
    assert get_arch({"model_type": model_type}).model_type == model_type


@pytest.mark.parametrize("config", [{"model_type": "llama"}, {}])
def test_unknown_model_type_lists_supported(config: dict) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"is not supported; supported: deepseek_v2, .*qwen3_moe"):
        get_arch(config)


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'llama'"):
        get_arch({"model_type": "llama"})


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 4}, [0, 1, 2, 3]),
    ({"num_hidden_layers": 4, "decoder_sparse_step": 2}, [1, 3]),
    ({"num_hidden_layers": 4, "mlp_only_layers": [0, 2]}, [1, 3]),
    ({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1, 5]),
])
@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_layers(model_type: str, config: dict, expected: list[int]) -> None:
    assert get_arch({"model_type": model_type}).moe_layers(config) == expected


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 4, "n_routed_experts": 8}, [0, 1, 2, 3]),
    ({"num_hidden_layers": 4, "n_routed_experts": 8, "first_k_dense_replace": 1}, [1, 2, 3]),
    ({"num_hidden_layers": 6, "n_routed_experts": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}, [2, 4]),
    ({"num_hidden_layers": 4, "n_routed_experts": None}, []),
])
@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_moe_layers(model_type: str, config: dict, expected: list[int]) -> None:
    assert get_arch({"model_type": model_type}).moe_layers(config) == expected


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_all_layers_moe(model_type: str) -> None:
    assert get_arch({"model_type": model_type}).moe_layers({"num_hidden_layers": 3}) == [0, 1, 2]


def test_missing_layer_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        get_arch({"model_type": "mixtral"}).moe_layers({})


def test_mixtral_hub_keys_map_w1_w3_w2() -> None:
    spec = REGISTRY["mixtral"]
    assert spec.expert_key("gate", 3, 7) == "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    assert spec.expert_key("up", 3, 7) == "model.layers.3.block_sparse_moe.experts.7.w3.weight"
    assert spec.expert_key("down", 3, 7) == "model.layers.3.block_sparse_moe.experts.7.w2.weight"
    assert spec.fused_key("gate_up", 3) == "model.layers.3.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
def test_mlp_hub_keys(model_type: str) -> None:
    spec = REGISTRY[model_type]
    assert spec.expert_key("up", 1, 2) == "model.layers.1.mlp.experts.2.up_proj.weight"
    assert spec.fused_key("down", 1) == "model.layers.1.mlp.experts.down_proj"


def test_bad_family_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown expert family 'gate_up'"):
        REGISTRY["olmoe"].expert_key("gate_up", 0, 0)


@pytest.mark.parametrize("model_type, name, group", [
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.gate_proj.weight", "shared_experts"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", "shared_expert_gate"),
    ("qwen2_moe", "model.layers.0.mlp.gate.weight", "routers"),
    ("qwen2_moe", "model.layers.1.mlp.down_proj.weight", "dense_mlps"),
    ("qwen2_moe", "model.layers.0.self_attn.q_proj.bias", "other"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "routers"),
    ("mixtral", "model.layers.0.mlp.gate.weight", "routers"),
    ("deepseek_v3", "model.layers.3.mlp.shared_experts.up_proj.weight", "shared_experts"),
    ("deepseek_v3", "model.layers.3.mlp.gate.e_score_correction_bias", "routers"),
    ("deepseek_v3", "model.layers.0.mlp.gate_proj.weight", "dense_mlps"),
    ("deepseek_v3", "model.layers.61.mlp.experts.0.gate_proj.weight", "extra_layers"),
    ("deepseek_v3", "model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv", "expert_extras"),
    ("olmoe", "lm_head.weight", "other"),
])
def test_classify_untouched(model_type: str, name: str, group: str) -> None:
    assert REGISTRY[model_type].classify_untouched(name, num_layers=61) == group


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_templates_match_transformers_in_memory(arch: str, tiny_model) -> None:
    """The in-memory (transformers 5.x) routed keys are exactly the fused templates over the MoE layers."""
    model = tiny_model(arch)
    spec, config = get_arch(model.config.to_dict()), model.config.to_dict()
    moe_layers = spec.moe_layers(config)
    assert moe_layers == [layer for layer in range(TINY.num_layers) if layer not in TINY_DENSE_LAYERS[arch]]
    keys = set(model.state_dict())
    routed = {k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert routed == {spec.fused_key(kind, layer) for layer in moe_layers for kind in ("gate_up", "down")}
    groups = {k: spec.classify_untouched(k, TINY.num_layers) for k in keys - routed}
    assert all(g == "routers" for k, g in groups.items() if ".mlp.gate." in k)
    assert all(g.startswith("shared_expert") for k, g in groups.items() if ".shared_expert" in k)
    assert {k for k, g in groups.items() if g == "dense_mlps"} == {
        f"model.layers.{layer}.mlp.{proj}_proj.weight" for layer in TINY_DENSE_LAYERS[arch]
        for proj in ("gate", "up", "down")}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_per_expert_templates_match_save_pretrained(arch: str, tiny_model, tiny_checkpoint) -> None:
    """save_pretrained writes exactly the per-expert templates over MoE layers x experts x families."""
    model = tiny_model(arch)
    spec, config = get_arch(model.config.to_dict()), model.config.to_dict()
    with safe_open(str(tiny_checkpoint(arch) / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    expected = {spec.expert_key(fam, layer, e) for layer in spec.moe_layers(config)
                for e in range(TINY.num_experts) for fam in ("gate", "up", "down")}
    assert expected <= keys
    assert not {k for k in keys - expected if ".experts." in k and ".shared_experts." not in k}
