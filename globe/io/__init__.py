"""Checkpoint input: the architecture registry, the streaming reader of routed MoE experts, and the registry
applied to a loaded transformers model (globe.io.model).

    from globe.io import open_checkpoint
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
        gate = reader.read_family("gate")      # ExpertStack: weights [N, p, d], ids [N, 2]
"""
from __future__ import annotations

from globe.io.arch import FAMILIES, GROUPS, LAYOUTS, REGISTRY, ArchSpec, get_arch, supported_model_types
from globe.io.checks import check_finite
from globe.io.model import ModelShape, checkpoint_shape, experts_modules, model_arch, model_shape, moe_layers
from globe.io.reader import CheckpointReader, ExpertStack, Inventory, open_checkpoint
from globe.io.shards import ShardSet, read_config

__all__ = [
    "FAMILIES", "GROUPS", "LAYOUTS", "REGISTRY", "ArchSpec", "get_arch", "supported_model_types",
    "CheckpointReader", "ExpertStack", "Inventory", "check_finite", "open_checkpoint",
    "ShardSet", "read_config", "ModelShape", "checkpoint_shape", "experts_modules", "model_arch", "model_shape",
    "moe_layers",
]
