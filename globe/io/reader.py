"""Streaming reader of routed MoE experts from a Hugging Face checkpoint directory (no model, no transformers).

    reader = open_checkpoint("path/to/model")
    reader.inventory()                       # arch, layers, E, top-k, p, d, layout, dtype, params per group
    for layer, w in reader.iter_layers("gate"):   # w: [E, p, d] (down: [E, d, p]), one layer read at a time
        ...
    stack = reader.read_family("up")         # ExpertStack: weights [N, p, d], ids [N, 2] (layer, expert)

Everything is validated from the safetensors headers when the reader opens (cheap, no tensor data), so shape
and completeness errors surface before any fitting starts. Stored dtypes are kept (bf16 stays bf16).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from globe.errors import CheckpointError, ConfigError, ShapeError, UnsupportedArchitectureError
from globe.io.arch import FAMILIES, GROUPS, ArchSpec, check_family, config_value, get_arch, validate_config
from globe.io.checks import check_finite
from globe.io.lazy import Block, LazyExperts, data_offsets
from globe.io.shards import ShardSet, read_config
from globe.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Inventory:
    """What a checkpoint holds, as GloBE sees it. Counts are parameters (elements), not bytes."""

    model_dir: str
    model_type: str
    arch: str
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int
    top_k: int | None
    p: int                       # routed expert intermediate size
    d: int                       # hidden size
    layout: str                  # "per_expert" | "fused"
    dtype: str                   # stored dtype of the routed experts, e.g. "bfloat16"
    shards: list[str]
    params: dict[str, int]       # routed params per family: {"gate": n, "up": n, "down": n}
    routed_params: int
    total_params: int            # every tensor in the checkpoint
    untouched: dict[str, int]    # group -> params (see globe.io.arch.GROUPS)
    untouched_tensors: dict[str, int]  # group -> number of tensors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        return cls(**data)


@dataclass
class ExpertStack:
    """One family's routed experts across layers: weights [N, p, d] (down: [N, d, p]), ids [N, 2] = (layer, expert).
    weights is a LazyExperts view (read on indexing) when read with lazy=True."""

    family: str
    weights: torch.Tensor | LazyExperts
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class CheckpointReader:
    """Lazy, validated view of the routed experts of one checkpoint directory."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        self.config: dict[str, Any] = read_config(self.model_dir)
        try:
            self.arch: ArchSpec = get_arch(self.config)
        except UnsupportedArchitectureError as exc:
            raise UnsupportedArchitectureError(f"{exc} (from {self.model_dir / 'config.json'})") from None
        validate_config(self.config, self.arch, self.model_dir / "config.json")
        self.shards = ShardSet(self.model_dir)
        self.num_layers = self.arch.num_layers(self.config)
        self.moe_layers = self.arch.moe_layers(self.config)
        self.num_experts = int(config_value(self.config, self.arch.num_experts_keys, self.arch.model_type))
        self.layout, self._routed = self._discover()
        self.p, self.d = self._validate_shapes()
        self.dtype = self._routed_dtype()
        self._inventory = self._build_inventory()
        self._content_hash: str | None = None
        log.info("opened %s: %s, %d MoE layers x %d experts, p=%d d=%d, %s layout, %s", self.model_dir,
                 self.arch.name, len(self.moe_layers), self.num_experts, self.p, self.d, self.layout, self.dtype)

    # ---- discovery and validation (headers only) ----
    def _discover(self) -> tuple[str, set[str]]:
        """Which layout holds the routed experts, and the names of the routed tensors (layers < num_layers)."""
        found: dict[str, dict[str, int]] = {"per_expert": {}, "fused": {}}
        for layout, matchers in self.arch.routed_matchers().items():
            for name in self.shards.keys():
                for regex in matchers.values():
                    match = regex.match(name)
                    if match and int(match["layer"]) < self.num_layers:
                        found[layout][name] = int(match["layer"])
        if found["per_expert"] and found["fused"]:
            raise CheckpointError(f"{self.model_dir} mixes per-expert and fused expert tensors (e.g. "
                                  f"{min(found['per_expert'])!r} and {min(found['fused'])!r}); save it in one layout")
        if not self.moe_layers:
            raise ConfigError(f"config.json of {self.model_dir} marks no layer as MoE; nothing to compress")
        if not found["per_expert"] and not found["fused"]:
            first = self.moe_layers[0]
            raise CheckpointError(f"no routed expert tensors in {self.model_dir} (expected keys like "
                                  f"{self.arch.expert_key('gate', first, 0)!r} or "
                                  f"{self.arch.fused_key('gate_up', first)!r}); is model_type right?")
        layout = "fused" if found["fused"] else "per_expert"
        for name, layer in sorted(found[layout].items()):
            if layer not in self.moe_layers:
                raise ConfigError(f"checkpoint tensor {name!r} is a routed expert of layer {layer}, which "
                                  f"config.json marks as dense; fix config.json or the checkpoint")
        return layout, set(found[layout])

    def _routed_kinds(self) -> dict[str, str]:
        """Every routed tensor name config.json implies -> its kind ("gate"/"up"/"down" or "gate_up"/"down")."""
        if self.layout == "fused":
            return {self.arch.fused_key(kind, layer): kind for layer in self.moe_layers for kind in ("gate_up", "down")}
        return {self.arch.expert_key(family, layer, e): family for layer in self.moe_layers
                for e in range(self.num_experts) for family in FAMILIES}

    def _validate_shapes(self) -> tuple[int, int]:
        """Every routed tensor present with one consistent shape that agrees with config.json; returns (p, d)."""
        kinds = self._routed_kinds()
        for name in sorted(self._routed - set(kinds)):
            raise ShapeError(f"routed expert tensor {name!r} is outside config.json's {self.num_experts} "
                             f"experts; fix num_experts in config.json or the checkpoint")
        for name in kinds:
            if name not in self.shards:
                raise CheckpointError(f"routed expert tensor {name!r} is missing from {self.model_dir}; "
                                      f"the checkpoint is incomplete")
        p, d = self._common_dims(kinds)
        e = self.num_experts
        expected = {"gate": (p, d), "up": (p, d), "down": (d, p)} if self.layout == "per_expert" else \
            {"gate_up": (e, 2 * p, d), "down": (e, d, p)}
        for name, kind in kinds.items():
            if self.shards.shape(name) != expected[kind]:
                raise ShapeError(f"routed expert tensor {name!r} has shape {list(self.shards.shape(name))}, "
                                 f"expected {list(expected[kind])} (E={e}, p={p}, d={d}); the checkpoint is "
                                 f"inconsistent")
        return p, d

    def _common_dims(self, kinds: dict[str, str]) -> tuple[int, int]:
        """(p, d) from the most common gate (or gate_up) shape, cross-checked against config.json."""
        ref_kind = "gate_up" if self.layout == "fused" else "gate"
        names = [name for name, kind in kinds.items() if kind == ref_kind]
        shapes = Counter(self.shards.shape(name) for name in names)
        shape = shapes.most_common(1)[0][0]
        name = next(n for n in names if self.shards.shape(n) == shape)
        if len(shape) != (3 if ref_kind == "gate_up" else 2) or (ref_kind == "gate_up" and shape[1] % 2):
            raise ShapeError(f"routed expert tensor {name!r} has shape {list(shape)}, expected "
                             f"{'[E, 2p, d]' if ref_kind == 'gate_up' else '[p, d]'}")
        p, d = (shape[1] // 2, shape[2]) if ref_kind == "gate_up" else (shape[0], shape[1])
        spec = self.arch
        for value, keys in ((p, spec.expert_size_keys), (d, spec.hidden_size_keys)):
            want = int(config_value(self.config, keys, spec.model_type))
            if want != value:
                raise ShapeError(f"routed expert tensor {name!r} implies {keys[0]}={value} but config.json says "
                                 f"{want}; the config does not match the weights")
        return p, d

    def _routed_dtype(self) -> str:
        by_dtype: dict[str, list[str]] = {}
        for name in self._routed:
            by_dtype.setdefault(self.shards.dtype(name), []).append(name)
        dtypes = set(by_dtype)
        if len(dtypes) != 1:
            odd = min(by_dtype, key=lambda k: len(by_dtype[k]))          # the rarer dtype is the odd one out
            raise CheckpointError(f"routed expert tensor {by_dtype[odd][0]!r} of {self.model_dir} is {odd} while "
                                  f"others are {sorted(dtypes - {odd})}; re-save the checkpoint in one dtype")
        dtype = dtypes.pop()
        if not dtype.startswith(("float", "bfloat")) or dtype.startswith("float8"):
            raise CheckpointError(f"routed experts of {self.model_dir} are stored as {dtype}; GloBE reads "
                                  f"float32/float16/bfloat16 only, dequantize the checkpoint first")
        return dtype

    # ---- inventory ----
    def _build_inventory(self) -> Inventory:
        untouched = {group: 0 for group in GROUPS}
        tensors = {group: 0 for group in GROUPS}
        total = 0
        for name in self.shards.keys():
            n = self.shards.numel(name)
            total += n
            if name not in self._routed:
                group = self.arch.classify_untouched(name, self.num_layers)
                untouched[group] += n
                tensors[group] += 1
        per_family = len(self.moe_layers) * self.num_experts * self.p * self.d
        top_k = config_value(self.config, self.arch.top_k_keys, self.arch.model_type, required=False)
        return Inventory(
            model_dir=str(self.model_dir), model_type=self.arch.model_type, arch=self.arch.name,
            num_layers=self.num_layers, moe_layers=list(self.moe_layers),
            dense_layers=[layer for layer in range(self.num_layers) if layer not in self.moe_layers],
            num_experts=self.num_experts, top_k=None if top_k is None else int(top_k), p=self.p, d=self.d,
            layout=self.layout, dtype=self.dtype, shards=list(self.shards.files),
            params={family: per_family for family in FAMILIES}, routed_params=3 * per_family, total_params=total,
            untouched={g: n for g, n in untouched.items() if tensors[g]},
            untouched_tensors={g: n for g, n in tensors.items() if n})

    def inventory(self) -> Inventory:
        """The checkpoint's inventory (computed from headers at open time; a fresh copy each call)."""
        return Inventory.from_dict(self._inventory.to_dict())

    # ---- reading ----
    def iter_layers(self, family: str, layers: Iterable[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (layer, W[E, p, d]) (down: [E, d, p]) per MoE layer, reading only that layer's tensors."""
        check_family(family)
        for layer in self._select_layers(layers):
            yield layer, self._read_layer(family, layer)

    def read_family(self, family: str, layers: Iterable[int] | None = None, lazy: bool = False) -> ExpertStack:
        """All routed experts of one family stacked layer-major: weights [N, p, d] (down: [N, d, p]).

        lazy=True returns a LazyExperts view instead of a tensor: nothing is read until it is indexed.
        """
        check_family(family)
        selected = self._select_layers(layers)
        e = self.num_experts
        rows, cols = (self.d, self.p) if family == "down" else (self.p, self.d)
        if lazy:
            weights = LazyExperts(self._blocks(family, selected), rows, cols, getattr(torch, self.dtype))
        else:
            weights = torch.empty(len(selected) * e, rows, cols, dtype=getattr(torch, self.dtype))
            layers = progress(self.iter_layers(family, selected), f"read {family}", len(selected))
            for i, (_, layer_weights) in enumerate(layers):
                weights[i * e:(i + 1) * e] = layer_weights
        layer_ids = torch.tensor(selected, dtype=torch.long).repeat_interleave(e)
        expert_ids = torch.arange(e, dtype=torch.long).repeat(len(selected))
        return ExpertStack(family=family, weights=weights, ids=torch.stack([layer_ids, expert_ids], dim=1))

    def _blocks(self, family: str, layers: list[int]) -> list[Block]:
        """Where each expert of `family` lives on disk, layer-major (see globe.io.lazy)."""
        offsets: dict[str, dict[str, tuple[int, int]]] = {}

        def locate(name: str) -> tuple[Path, int]:
            file = self.shards.location[name]
            if file not in offsets:
                offsets[file] = data_offsets(self.model_dir / file)
            return self.model_dir / file, offsets[file][name][0]

        size = self.p * self.d * getattr(torch, self.dtype).itemsize                # bytes of one expert
        blocks = []
        for layer in layers:
            if self.layout == "per_expert":
                names = [self.arch.expert_key(family, layer, e) for e in range(self.num_experts)]
                blocks += [Block(*locate(name), name) for name in names]
                continue
            name = self.arch.fused_key("down" if family == "down" else "gate_up", layer)
            path, base = locate(name)
            stride = size * (1 if family == "down" else 2)
            shift = size if family == "up" else 0
            blocks += [Block(path, base + e * stride + shift, name) for e in range(self.num_experts)]
        return blocks

    def _select_layers(self, layers: Iterable[int] | None) -> list[int]:
        if layers is None:
            return list(self.moe_layers)
        selected = sorted(set(int(layer) for layer in layers))
        for layer in selected:
            if layer not in self.moe_layers:
                raise ConfigError(f"layer {layer} of {self.model_dir} is not a MoE layer; MoE layers are "
                                  f"{self.moe_layers}")
        return selected

    def _read_layer(self, family: str, layer: int) -> torch.Tensor:
        if self.layout == "fused":
            if family == "down":
                name = self.arch.fused_key("down", layer)
                weights = self.shards.get(name)
            else:
                name = self.arch.fused_key("gate_up", layer)
                start = 0 if family == "gate" else self.p
                weights = self.shards.get_rows(name, start, start + self.p)
            check_finite(weights, name)
            return weights
        experts = []
        for expert in range(self.num_experts):
            name = self.arch.expert_key(family, layer, expert)
            experts.append(self.shards.get(name))
            check_finite(experts[-1], name)
        return torch.stack(experts)

    def expert_blocks(self, family: str) -> list[Block]:
        """Where each routed expert matrix of `family` lies on disk, layer-major (see globe.io.lazy.Block)."""
        return self._blocks(check_family(family), list(self.moe_layers))

    def content_hash(self) -> str:
        """Hash of the routed experts' names, shapes and bytes (see globe.io.identity); cached."""
        if self._content_hash is None:
            from globe.io.identity import content_hash
            self._content_hash = content_hash(self)
        return self._content_hash

    def tensor(self, name: str) -> torch.Tensor:
        """Any tensor of the checkpoint by its stored name, in its stored dtype."""
        return self.shards.get(name)

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return self.shards.keys()

    def group_of(self, name: str) -> str:
        """"routed" for a routed expert tensor, else its untouched group (see globe.io.arch.GROUPS)."""
        if name not in self.shards:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        return "routed" if name in self._routed else self.arch.classify_untouched(name, self.num_layers)

    def close(self) -> None:
        self.shards.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(model_dir: str | os.PathLike[str]) -> CheckpointReader:
    """Open and validate a checkpoint directory; see CheckpointReader."""
    return CheckpointReader(model_dir)
