"""In-memory layouts of a loaded model's routed-experts module, registered by name; an ArchSpec names its layout.

    layout = spec.layout                            # ExpertsLayout of an architecture (globe.io.arch)
    num_experts, p, d = layout.dims(module)
    gate = layout.weight(module, "gate")            # [E, p, d] (a view where the layout allows)
    h = layout.activation(module)(gate_x) * up_x    # the experts' activation, applied to the gate projection
    state = layout.state({"gate": g, "up": u, "down": w})   # the module's own state-dict entries for dense weights

Every layout computes y = down(act(gate(x)) * up(x)) per expert (what GlobeExperts replaces); they differ in how
the module stores the three [E, out, in] weights. Registered here:
  fused_gate_up        transformers 5.x: gate_up_proj [E, 2p, d] with the gate rows first, down_proj [E, d, p], act_fn
  interleaved_gate_up  gpt-oss style: gate_up_proj [E, 2p, d] with gate and up rows interleaved (gate = even rows)
An architecture whose experts store their weights another way is one ExpertsLayout subclass registered with
register_layout, named by its ArchSpec (`experts_layout`). Nothing outside this module reads those attributes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from globe.errors import ArtifactError, ConfigError

FAMILIES: tuple[str, ...] = ("gate", "up", "down")


class ExpertsLayout:
    """How one kind of routed-experts module stores its per-expert gate / up / down weights."""

    name: str = ""
    attributes: tuple[str, ...] = ()           # attributes an original module of this layout has
    kind: str = ""                             # how messages call such a module ("fused", ...)

    def is_original(self, module: nn.Module) -> bool:
        """Whether `module` is an unpatched experts module of this layout."""
        return all(hasattr(module, a) for a in self.attributes)

    def check(self, module: nn.Module, path: str) -> None:
        """ArtifactError naming `path` unless `module` is an original experts module of this layout."""
        if not self.is_original(module):
            raise ArtifactError(f"{path} ({type(module).__name__}) is not a {self.kind} experts module with "
                                f"{'/'.join(self.attributes)} ({self.name} layout); unsupported transformers version?")

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        """(E, p, d): experts, expert intermediate size, hidden size."""
        raise NotImplementedError

    def weight(self, module: nn.Module, family: str) -> torch.Tensor:
        """The family's weights [E, out, in] ((p, d) for gate/up, (d, p) for down)."""
        raise NotImplementedError

    def state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's state-dict entries (names relative to the module) holding these [E, out, in] weights."""
        raise NotImplementedError

    def activation(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The elementwise activation applied to the gate projection."""
        return module.act_fn

    def tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The stored tensors holding the weights (what the module's routed-expert parameters count)."""
        return [getattr(module, a) for a in self.attributes if isinstance(getattr(module, a), torch.Tensor)]

    def set_weights(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy [E, out, in] weights of some families into the module, in place (its dtype and device)."""
        state = self.state({f: weights.get(f, self.weight(module, f)) for f in FAMILIES})
        with torch.no_grad():
            for name, tensor in state.items():
                getattr(module, name).copy_(tensor)

    def dtype(self, module: nn.Module) -> torch.dtype:
        return self.tensors(module)[0].dtype

    def device(self, module: nn.Module) -> torch.device:
        return self.tensors(module)[0].device


class FusedGateUp(ExpertsLayout):
    """transformers 5.x: gate_up_proj [E, 2p, d] (rows :p = gate, p: = up), down_proj [E, d, p], act_fn."""

    name = "fused_gate_up"
    kind = "fused"
    attributes = ("gate_up_proj", "down_proj")

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        num_experts, two_p, d = module.gate_up_proj.shape
        return num_experts, two_p // 2, d

    def _rows(self, p: int, family: str) -> slice:
        return slice(0, p) if family == "gate" else slice(p, 2 * p)

    def weight(self, module: nn.Module, family: str) -> torch.Tensor:
        if family == "down":
            return module.down_proj
        return module.gate_up_proj[:, self._rows(module.gate_up_proj.shape[1] // 2, family)]

    def state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"gate_up_proj": torch.cat([weights["gate"], weights["up"]], dim=1).contiguous(),
                "down_proj": weights["down"].contiguous()}


class InterleavedGateUp(FusedGateUp):
    """gpt-oss style: gate_up_proj [E, 2p, d] with gate rows at even and up rows at odd indices."""

    name = "interleaved_gate_up"

    def _rows(self, p: int, family: str) -> slice:
        return slice(0, 2 * p, 2) if family == "gate" else slice(1, 2 * p, 2)

    def state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gate_up = torch.stack([weights["gate"], weights["up"]], dim=2)                  # [E, p, 2, d]
        return {"gate_up_proj": gate_up.flatten(1, 2).contiguous(), "down_proj": weights["down"].contiguous()}


EXPERTS_LAYOUTS: dict[str, ExpertsLayout] = {}


def register_layout(layout: ExpertsLayout) -> ExpertsLayout:
    """Register an experts layout under its name (ConfigError if the name is taken by another layout)."""
    if EXPERTS_LAYOUTS.get(layout.name, layout) is not layout:
        raise ConfigError(f"experts layout {layout.name!r} is already registered")
    EXPERTS_LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> ExpertsLayout:
    if name not in EXPERTS_LAYOUTS:
        raise ConfigError(f"unknown experts layout {name!r}; registered: {', '.join(sorted(EXPERTS_LAYOUTS))}")
    return EXPERTS_LAYOUTS[name]


register_layout(FusedGateUp())
register_layout(InterleavedGateUp())
