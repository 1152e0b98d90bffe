"""Bad checkpoints raise the project's own errors, each naming the file or tensor at fault."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe.errors import (CheckpointError, ConfigError, ModelDirError, NumericalError, ShapeError,
                          UnsupportedArchitectureError)
from globe.io import check_finite, open_checkpoint

GATE_0_2 = "model.layers.0.mlp.experts.2.gate_proj.weight"  # qwen2_moe: layer 0 is MoE


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None], file: str = "model.safetensors") -> None:
    tensors = load_file(str(path / file))
    edit(tensors)
    save_file(tensors, str(path / file), metadata={"format": "pt"})


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _shard_files(path: Path) -> list[str]:
    return sorted(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=f"{re.escape(str(tmp_path / 'nope'))}' does not exist"):
        open_checkpoint(tmp_path / "nope")


def test_no_config_json(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    (path / "config.json").unlink()
    with pytest.raises(ModelDirError, match="no config.json in"):
        open_checkpoint(path)


def test_invalid_config_json(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    (path / "config.json").write_text('{"model_type": "qwen2_moe",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        open_checkpoint(path)


def test_no_weight_files(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="no safetensors weights in"):
        open_checkpoint(path)


def test_unknown_model_type(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    _edit_config(path, model_type="llama")
    with pytest.raises(UnsupportedArchitectureError, match=r"'llama' is not supported; supported: deepseek_v2"):
        open_checkpoint(path)


def test_missing_config_key(mutable_checkpoint) -> None:
    path = mutable_checkpoint("mixtral")
    _edit_config(path, num_local_experts=None)
    with pytest.raises(ConfigError, match="lacks 'num_local_experts' / 'num_experts'"):
        open_checkpoint(path)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_index_names_missing_shard(layout: str, mutable_checkpoint) -> None:
    path = mutable_checkpoint("olmoe", layout=layout, shards=2)
    victim = _shard_files(path)[-1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{victim}' listed in .*model\.safetensors\.index\.json"):
        open_checkpoint(path)


def test_index_disagrees_with_shard(mutable_checkpoint) -> None:
    path = mutable_checkpoint("olmoe", layout="fused", shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name, file = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(f for f in _shard_files(path) if f != file)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' is listed in .* but that shard lacks it"):
        open_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("shards", [1, 2])
def test_corrupt_safetensors(damage: str, shards: int, mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe", shards=shards)
    file = "model.safetensors" if shards == 1 else _shard_files(path)[0]
    size = os.path.getsize(path / file)
    data = (path / file).read_bytes()[: size // 2] if damage == "truncate" else os.urandom(size)
    (path / file).write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{re.escape(file)} is truncated or corrupt"):
        open_checkpoint(path)


def test_expert_with_different_p(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    _rewrite(path, lambda t: t.update({GATE_0_2: torch.zeros(9, 24)}))
    with pytest.raises(ShapeError, match=rf"'{re.escape(GATE_0_2)}' has shape \[9, 24\], expected \[8, 24\]"):
        open_checkpoint(path)


def test_fused_layer_with_wrong_expert_count(mutable_checkpoint) -> None:
    path = mutable_checkpoint("mixtral", layout="fused")
    name = "model.layers.1.mlp.experts.down_proj"
    _rewrite(path, lambda t: t.update({name: t[name][:3].contiguous()}))
    with pytest.raises(ShapeError, match=rf"'{re.escape(name)}' has shape \[3, 24, 8\], expected \[4, 24, 8\]"):
        open_checkpoint(path)


def test_config_disagrees_with_weights(mutable_checkpoint) -> None:
    path = mutable_checkpoint("deepseek_v3")
    _edit_config(path, moe_intermediate_size=16)
    with pytest.raises(ShapeError, match="implies moe_intermediate_size=8 but config.json says 16"):
        open_checkpoint(path)


def test_routed_experts_in_a_dense_layer(mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe")
    _edit_config(path, mlp_only_layers=[0, 1])
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.mlp\.experts\.0\..*' is a routed expert of layer 0"):
        open_checkpoint(path)


@pytest.mark.parametrize("layout, name", [
    ("per_expert", "model.layers.2.mlp.experts.3.up_proj.weight"),
    ("fused", "model.layers.2.mlp.experts.gate_up_proj"),
])
def test_missing_expert_tensor(layout: str, name: str, mutable_checkpoint) -> None:
    path = mutable_checkpoint("deepseek_v2", layout=layout)
    _rewrite(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' is missing"):
        open_checkpoint(path)


def test_no_routed_experts_at_all(mutable_checkpoint) -> None:
    path = mutable_checkpoint("mixtral")
    _edit_config(path, model_type="olmoe", num_experts=4)
    with pytest.raises(CheckpointError, match=r"no routed expert tensors .*model\.layers\.0\.mlp\.experts\.0"):
        open_checkpoint(path)


def test_float8_experts_rejected(mutable_checkpoint) -> None:
    path = mutable_checkpoint("olmoe", layout="fused")
    _rewrite(path, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items() if ".experts." in k}))
    with pytest.raises(CheckpointError, match="stored as float8_e4m3fn; .* dequantize"):
        open_checkpoint(path)


@pytest.mark.parametrize("layout, name", [("per_expert", GATE_0_2), ("fused", "model.layers.2.mlp.experts.down_proj")])
def test_nan_expert_raises_on_read(layout: str, name: str, mutable_checkpoint) -> None:
    path = mutable_checkpoint("qwen2_moe", layout=layout)
    _rewrite(path, lambda t: t[name].view(-1)[5].fill_(float("nan")))
    reader = open_checkpoint(path)
    family = "gate" if "gate" in name else "down"
    with pytest.raises(NumericalError, match=rf"'{re.escape(name)}' holds 1 NaN/Inf"):
        reader.read_family(family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_finite(dtype: torch.dtype) -> None:
    tensor = torch.ones(2, 3, 4, dtype=dtype)
    check_finite(tensor, "w")
    tensor[1, 2, 0] = float("inf")
    tensor[1, 2, 3] = float("nan")
    with pytest.raises(NumericalError, match=r"'w' holds 2 NaN/Inf value\(s\) \(first at index \(1, 2, 0\)\)"):
        check_finite(tensor, "w")
