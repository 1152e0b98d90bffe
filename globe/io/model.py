"""The architecture registry applied to a loaded transformers model: where its routed experts are and what shape
they have, for calibration, runtime and export alike (no layer above io re-derives these facts).

    spec, config = model_arch(model)           # ArchSpec and the config dict
    modules = experts_modules(model)           # {layer: routed-experts module} of every MoE layer
    shape = model_shape(model)                 # ModelShape: model_type, MoE layers, E, p, d (what an artifact must fit)

A routed-experts module is either the architecture's original one, read through its ExpertsLayout
(globe.io.layout: transformers' fused gate_up_proj [E, 2p, d] / down_proj [E, d, p], ...), or one that states its
dimensions and factored families (num_experts, intermediate_dim, hidden_dim, factored), as the runtime's
GlobeExperts does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from globe.errors import ArtifactError
from globe.io.arch import ArchSpec, get_arch
from globe.io.layout import ExpertsLayout
from globe.io.reader import open_checkpoint


@dataclass(frozen=True)
class ModelShape:
    """What an artifact must match: read from a loaded model (model_shape) or a checkpoint's headers
    (checkpoint_shape). `factored` is set for a model already patched by GloBE (the families it factors)."""

    name: str                          # how messages name the model: "the model" or its directory
    model_type: str
    moe_layers: list[int]
    num_experts: int
    p: int                             # routed expert intermediate size
    d: int                             # hidden size
    factored: tuple[str, ...] | None = None


def model_arch(model: nn.Module) -> tuple[ArchSpec, dict]:
    """(ArchSpec, config dict) of a loaded transformers model."""
    config = model.config.to_dict()
    return get_arch(config), config


def moe_layers(model: nn.Module) -> list[int]:
    spec, config = model_arch(model)
    return spec.moe_layers(config)


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer -> routed-experts module (original or GloBE's) at the registry's path, for every MoE layer."""
    spec, config = model_arch(model)
    out = {}
    for layer in spec.moe_layers(config):
        try:
            out[layer] = model.get_submodule(spec.experts_path(layer))
        except AttributeError:
            raise ArtifactError(f"model has no module {spec.experts_path(layer)!r} although config marks layer "
                                f"{layer} as MoE; is this a {spec.name} model loaded with transformers >= 5?") from None
    return out


def experts_dims(module: nn.Module, path: str, layout: ExpertsLayout) -> tuple[int, int, int]:
    """(E, p, d) of one routed-experts module (see the module docstring); ArtifactError for anything else."""
    if hasattr(module, "factored"):
        return module.num_experts, module.intermediate_dim, module.hidden_dim
    layout.check(module, path)
    return layout.dims(module)


def model_shape(model: nn.Module) -> ModelShape:
    """ModelShape of a loaded (original or patched) model, from its config and its first MoE layer's module."""
    spec, _ = model_arch(model)
    modules = experts_modules(model)
    dims = {layer: experts_dims(m, spec.experts_path(layer), spec.layout) for layer, m in modules.items()}
    num_experts, p, d = next(iter(dims.values()))
    factored = {tuple(m.factored) for m in modules.values() if hasattr(m, "factored")}
    return ModelShape("the model", spec.model_type, list(modules), num_experts, p, d,
                      next(iter(factored)) if factored else None)


def checkpoint_shape(model_dir: str | Path) -> ModelShape:
    """ModelShape of a checkpoint directory, from its config and safetensors headers only (no model built)."""
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
    return ModelShape(str(model_dir), inv.model_type, list(inv.moe_layers), inv.num_experts, inv.p, inv.d)
