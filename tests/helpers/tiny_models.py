"""Tiny random MoE models and checkpoints for tests, built from transformers' own config classes.

    model = make_tiny_model("qwen2_moe", seed=0)                       # deterministic, distinct random weights
    path = make_tiny_checkpoint("mixtral", tmp_path / "m", layout="fused", shards=2, dtype=torch.bfloat16)
    ref = reference_experts(model.state_dict())                        # {"gate": ExpertStack, ...} from memory

Every tiny model has TINY.num_layers layers, TINY.num_experts routed experts of size TINY.p, hidden size TINY.d;
TINY_DENSE_LAYERS says which layers are dense per architecture. Layouts: "per_expert" = hub keys written by
`save_pretrained` (sharded with `max_shard_size` when shards > 1); "fused" = the in-memory transformers 5.x
state_dict (experts.gate_up_proj [E, 2p, d], experts.down_proj [E, d, p]) written with safetensors' save_file
(sharded with a hub-style model.safetensors.index.json when shards > 1).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from globe.io.reader import ExpertStack


@dataclass(frozen=True)
class TinyDims:
    num_layers: int = 3
    num_experts: int = 4
    top_k: int = 2
    p: int = 8          # routed expert intermediate size (2p != d so transposes and gate/up mix-ups show)
    d: int = 24         # hidden size
    dense_p: int = 20   # dense MLP intermediate size
    shared_p: int = 12  # shared expert intermediate size


TINY = TinyDims()
TINY_ARCHS: tuple[str, ...] = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3")
TINY_DENSE_LAYERS: dict[str, list[int]] = {"qwen2_moe": [1], "qwen3_moe": [2], "olmoe": [], "mixtral": [],
                                           "deepseek_v2": [0], "deepseek_v3": [0]}
_FUSED_GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$")  # transformers 5.x in memory

_COMMON: dict[str, Any] = dict(vocab_size=64, hidden_size=TINY.d, num_hidden_layers=TINY.num_layers,
                               num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=TINY.top_k,
                               max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
_MLA: dict[str, Any] = dict(intermediate_size=TINY.dense_p, moe_intermediate_size=TINY.p,
                            n_routed_experts=TINY.num_experts, n_shared_experts=1, first_k_dense_replace=1,
                            kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_group=1,
                            topk_group=1, num_key_value_heads=2)
_ARCH_KWARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=TINY.dense_p, moe_intermediate_size=TINY.p,
                                         shared_expert_intermediate_size=TINY.shared_p,
                                         num_experts=TINY.num_experts, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=TINY.dense_p, moe_intermediate_size=TINY.p,
                                         num_experts=TINY.num_experts, head_dim=12, mlp_only_layers=[2])),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=TINY.p, num_experts=TINY.num_experts)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=TINY.p, num_local_experts=TINY.num_experts)),
    "deepseek_v2": ("DeepseekV2Config", dict(_MLA, q_lora_rank=None)),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, q_lora_rank=8)),
}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config (PretrainedConfig) of a tiny `arch` model; overrides replace any field."""
    import transformers

    if arch not in _ARCH_KWARGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    class_name, kwargs = _ARCH_KWARGS[arch]
    return getattr(transformers, class_name)(**{**_COMMON, **kwargs, **overrides})


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A tiny random causal LM; every parameter is refilled from a seeded generator (same seed, same weights)."""
    import transformers

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)
    return model.to(dtype).eval()


def make_tiny_checkpoint(arch: str, out_dir: str | Path, layout: str = "per_expert", shards: int = 1,
                         dtype: torch.dtype = torch.float32, seed: int = 0, model: Any = None,
                         **overrides: Any) -> Path:
    """Write a tiny `arch` checkpoint (config.json + safetensors) to out_dir and return it.

    `model` saves that model instead of building one (seed, dtype and overrides are then ignored).
    shards > 1 gives a sharded checkpoint with an index; for "per_expert", save_pretrained's greedy packing
    decides the exact count (shards or one more).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else make_tiny_model(arch, seed=seed, dtype=dtype, **overrides)
    if layout == "per_expert":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kwargs = {"max_shard_size": math.ceil(total / shards)} if shards > 1 else {}
        model.save_pretrained(out, **kwargs)
    elif layout == "fused":
        model.config.save_pretrained(out)
        write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, out, shards)
    else:
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int = 1) -> list[str]:
    """Write tensors as model.safetensors, or as `shards` files plus model.safetensors.index.json."""
    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    files, weight_map = [], {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {name: tensors[name] for name in names[i * per_shard:(i + 1) * per_shard]}
        save_file(chunk, str(out_dir / file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def reference_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, ExpertStack]:
    """Routed experts straight from a model's in-memory (fused) state_dict, layer-major then expert order.

    gate = gate_up_proj[:, :p], up = gate_up_proj[:, p:], down = down_proj; weights [N, p, d] ([N, d, p] for down).
    """
    layers = sorted(int(m.group(1)) for k in state_dict if (m := _FUSED_GATE_UP.match(k)))
    gate_up = [state_dict[f"model.layers.{layer}.mlp.experts.gate_up_proj"] for layer in layers]
    down = [state_dict[f"model.layers.{layer}.mlp.experts.down_proj"] for layer in layers]
    num_experts, two_p, _ = gate_up[0].shape
    p = two_p // 2
    ids = torch.tensor([(layer, e) for layer in layers for e in range(num_experts)], dtype=torch.long)
    return {"gate": ExpertStack("gate", torch.cat([w[:, :p] for w in gate_up]), ids),
            "up": ExpertStack("up", torch.cat([w[:, p:] for w in gate_up]), ids.clone()),
            "down": ExpertStack("down", torch.cat(down), ids.clone())}
