"""Safetensors shard discovery, validation and lazy access, without building the model or importing transformers.

A checkpoint directory holds config.json plus either one `model.safetensors` or several shards listed by
`model.safetensors.index.json` (a bare set of *.safetensors files is accepted too). `ShardSet` reads every
shard's header once (cheap: no tensor data), maps tensor name -> shard, and opens shards lazily with
`safetensors.safe_open` (mmap). Tensors keep their stored dtype. Every failure is a project error naming the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from globe.errors import CheckpointError, ConfigError, ModelDirError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype -> torch dtype name.
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def missing_config_message(model_dir: Path) -> str:
    """Why a directory without config.json is not a checkpoint, and what to pass instead."""
    where = repr(str(model_dir))
    if (model_dir / "banks.safetensors").is_file() or (model_dir / "globe_config.json").is_file():
        return (f"{where} is a GloBE artifact, not a model: pass the checkpoint it was fitted on as MODEL_DIR "
                f"and the artifact with --globe {model_dir}")
    if model_dir.name.startswith("models--") and (model_dir / "snapshots").is_dir():
        snapshots = sorted(p.name for p in (model_dir / "snapshots").iterdir())
        hint = f"{model_dir / 'snapshots' / snapshots[-1]}" if snapshots else "its snapshots/<revision> directory"
        return (f"{where} is a Hugging Face cache root, not a checkpoint: pass {hint} or the hub id "
                f"{'/'.join(model_dir.name.split('--')[1:])}")
    return f"no config.json in {where}; pass a Hugging Face checkpoint directory"


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict; ModelDirError if the directory or file is missing, ConfigError if it is not JSON."""
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {str(model_dir)!r} does not exist; pass a Hugging Face checkpoint "
                            f"directory (config.json + *.safetensors)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(missing_config_message(model_dir))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def find_weight_files(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names, index weight_map or None). Errors name the index or shard at fault."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                raise CheckpointError(f"shard {name!r} listed in {index_path} is missing; re-download the checkpoint")
        return files, weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        hint = (" (only pickle .bin weights found, which GloBE never loads: convert them in a trusted environment "
                "with AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR), which writes safetensors)"
                if any(model_dir.glob("*.bin")) else "")
        raise ModelDirError(f"no safetensors weights in {str(model_dir)!r}{hint}; expected {SINGLE_FILE} "
                            f"or {INDEX_FILE} with its shards")
    return files, None


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(exc).__name__}: {exc}); "
                              f"re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


class ShardSet:
    """All tensors of a checkpoint directory: headers read and validated at construction, data read lazily."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.files, index = find_weight_files(model_dir)
        self._handles: dict[str, Any] = {}
        self.location: dict[str, str] = {}          # tensor name -> shard file name
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for file in self.files:
            self._scan(file)
        if index is not None:
            self._check_index(index)
        log.debug("%s: %d tensors in %d shard(s)", model_dir, len(self.location), len(self.files))

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            path = self.model_dir / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} is truncated or corrupt ({exc}); re-download or re-save it") from None
        return self._handles[file]

    def _scan(self, file: str) -> None:
        handle = self._open(file)
        for name in handle.keys():
            if name in self.location:
                raise CheckpointError(f"tensor {name!r} appears in both {self.location[name]} and {file}")
            tensor_slice = handle.get_slice(name)
            self.location[name] = file
            self._shape[name] = tuple(int(s) for s in tensor_slice.get_shape())
            raw = tensor_slice.get_dtype()
            self._dtype[name] = _DTYPES.get(raw, raw.lower())

    def _check_index(self, weight_map: dict[str, str]) -> None:
        index = self.model_dir / INDEX_FILE
        for name, file in weight_map.items():
            if self.location.get(name) != file:
                raise CheckpointError(f"tensor {name!r} is listed in {index} under {file} but that shard lacks it; "
                                      f"the index and shards disagree, re-download the checkpoint")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[self._known(name)]

    def dtype(self, name: str) -> str:
        return self._dtype[self._known(name)]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        return self._read(name, None)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """tensor[:, start:stop] of a 3-D tensor, as a compact contiguous copy."""
        return self._read(name, (start, stop))

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        file = self.location[self._known(name)]
        try:
            handle = self._open(file)
            if rows is None:
                return handle.get_tensor(name)
            # safetensors 0.8 materializes the whole tensor for a strided slice; clone to free it.
            return handle.get_slice(name)[:, rows[0]:rows[1]].clone(memory_format=torch.contiguous_format)
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read {name!r} from {self.model_dir / file} ({exc}); "
                                  f"the shard is corrupt, re-download it") from None

    def _known(self, name: str) -> str:
        if name not in self.location:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        return name

    def close(self) -> None:
        """Close the open shard handles (releases their mmaps); later reads reopen lazily."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
