"""Architecture registry: every fact GloBE needs about a MoE architecture, keyed by config.json's `model_type`.

An `ArchSpec` says where the routed experts live in a checkpoint, in both layouts:
  per_expert  (hub files, what `save_pretrained` writes):  ...experts.{e}.gate_proj.weight  [p, d]
  fused       (transformers 5.x in memory):                 ...experts.gate_up_proj  [E, 2p, d] (rows :p = gate)
                                                            ...experts.down_proj     [E, d, p]
which config keys give E / top-k / p / d / layers, which layers are dense, and how to name every other tensor
(shared experts, routers, dense MLPs, ...), which GloBE leaves untouched, and which registered ExpertsLayout
(globe.io.layout) the loaded experts module has. Nothing outside this module and globe.io.layout hard-codes a
key or attribute name. Facts verified against transformers 5.24 (in-memory state_dict and `save_pretrained` output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from globe.errors import ConfigError, UnsupportedArchitectureError
from globe.io.layout import FAMILIES, ExpertsLayout, get_layout

LAYOUTS: tuple[str, ...] = ("per_expert", "fused")
# Untouched tensor groups, in the order they are reported; "other" = attention, embeddings, norms, lm_head.
GROUPS: tuple[str, ...] = ("shared_experts", "shared_expert_gate", "routers", "dense_mlps", "expert_extras",
                           "extra_layers", "other")

MoeRule = Callable[[dict[str, Any], int], bool]


def _all_layers(config: dict[str, Any], layer: int) -> bool:
    """Mixtral, OLMoE: every decoder layer is a MoE layer."""
    return True


def _qwen_rule(config: dict[str, Any], layer: int) -> bool:
    """Qwen2-MoE / Qwen3-MoE: MoE unless in `mlp_only_layers`, and only every `decoder_sparse_step`-th layer."""
    step = int(config.get("decoder_sparse_step") or 1)
    mlp_only = set(config.get("mlp_only_layers") or [])
    return layer not in mlp_only and (layer + 1) % step == 0


def _deepseek_rule(config: dict[str, Any], layer: int) -> bool:
    """DeepSeek-V2/V3: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return config.get("n_routed_experts") is not None and layer >= first_dense and layer % freq == 0


@dataclass(frozen=True)
class ArchSpec:
    """Everything GloBE knows about one MoE architecture. Key templates use `{layer}` and `{expert}`."""

    model_type: str
    name: str
    num_experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    expert_size_keys: tuple[str, ...]          # p: intermediate size of one routed expert
    hidden_size_keys: tuple[str, ...] = ("hidden_size",)
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    per_expert_keys: dict[str, str] = field(default_factory=dict)   # family -> template, weight [out, in]
    fused_keys: dict[str, str] = field(default_factory=dict)        # "gate_up" / "down" -> template
    untouched_patterns: tuple[tuple[str, str], ...] = ()            # (group, regex searched in the key)
    moe_rule: MoeRule = field(default=_all_layers, compare=False)
    layer_regex: str = r"^model\.layers\.(\d+)\."
    # In-memory module paths of a loaded transformers 5.x model (every supported arch calls its MoE block `mlp`):
    # the fused routed-experts module (forward(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d])
    # and the router beside it (forward -> (logits, top_k_weights, top_k_index)).
    experts_module: str = "model.layers.{layer}.mlp.experts"
    router_module: str = "model.layers.{layer}.mlp.gate"
    experts_layout: str = "fused_gate_up"      # name of the loaded experts module's ExpertsLayout (globe.io.layout)

    @property
    def layout(self) -> ExpertsLayout:
        """How the loaded routed-experts module stores its gate / up / down weights and activation."""
        return get_layout(self.experts_layout)

    def expert_key(self, family: str, layer: int, expert: int) -> str:
        """Hub (per-expert) key of one routed expert's weight, e.g. model.layers.3.mlp.experts.7.gate_proj.weight."""
        return self.per_expert_keys[check_family(family)].format(layer=layer, expert=expert)

    def fused_key(self, kind: str, layer: int) -> str:
        """Fused key of one layer's stacked experts; kind is "gate_up" or "down"."""
        return self.fused_keys[kind].format(layer=layer)

    def experts_path(self, layer: int) -> str:
        """Dotted path of one layer's routed-experts module in a loaded model, e.g. model.layers.3.mlp.experts."""
        return self.experts_module.format(layer=layer)

    def router_path(self, layer: int) -> str:
        """Dotted path of one layer's router module in a loaded model, e.g. model.layers.3.mlp.gate."""
        return self.router_module.format(layer=layer)

    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """Indices of the layers config.json marks as MoE layers (the others are dense)."""
        return [layer for layer in range(self.num_layers(config)) if self.moe_rule(config, layer)]

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(config_value(config, self.num_layers_keys, self.model_type))

    def layer_of(self, name: str) -> int | None:
        """Decoder layer index a tensor belongs to, or None for embeddings / final norm / lm_head."""
        match = re.search(self.layer_regex, name)
        return int(match.group(1)) if match else None

    def classify_untouched(self, name: str, num_layers: int) -> str:
        """Group of a tensor that is NOT a routed expert weight (see GROUPS)."""
        layer = self.layer_of(name)
        if layer is not None and layer >= num_layers:
            return "extra_layers"  # e.g. DeepSeek-V3's multi-token-prediction layer
        for group, pattern in self.untouched_patterns:
            if re.search(pattern, name):
                return group
        return "other"

    def routed_matchers(self) -> dict[str, dict[str, re.Pattern[str]]]:
        """Compiled regexes per layout and key kind, with named groups `layer` (and `expert` for per_expert)."""
        return {"per_expert": {fam: _template_regex(t) for fam, t in self.per_expert_keys.items()},
                "fused": {kind: _template_regex(t) for kind, t in self.fused_keys.items()}}


def config_value(config: dict[str, Any], keys: tuple[str, ...], model_type: str, required: bool = True) -> Any:
    """First present, non-null value among `keys` in config.json; ConfigError if required and none is present."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if required:
        raise ConfigError(f"config.json of this {model_type} model lacks {' / '.join(repr(k) for k in keys)}; "
                          f"add it (see the model card)")
    return None


# Optional config.json keys the MoE-layer rules read: key -> smallest allowed value (mlp_only_layers: a list).
_RULE_KEYS: dict[str, int] = {"decoder_sparse_step": 1, "moe_layer_freq": 1, "first_k_dense_replace": 0}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: dict[str, Any], spec: "ArchSpec", path: Any) -> None:
    """ConfigError naming `path` (config.json) and the key when a value GloBE reads has the wrong type or range:
    layer / expert counts and sizes must be positive integers, the MoE-layer rule keys integers, mlp_only_layers
    a list of layer indices."""
    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"{path}: {key!r} must be {want} (got {config[key]!r}); fix config.json")

    required = (spec.num_layers_keys, spec.num_experts_keys, spec.expert_size_keys, spec.hidden_size_keys)
    for keys in (*required, spec.top_k_keys):
        key = next((k for k in keys if config.get(k) is not None), None)
        if key is None:
            if keys is not spec.top_k_keys:
                raise ConfigError(f"{path} lacks {' / '.join(repr(k) for k in keys)}, which a {spec.model_type} "
                                  f"config needs; add it (see the model card)")
            continue
        if not _is_int(config[key]) or config[key] < 1:
            raise bad(key, "a positive integer")
    for key, minimum in _RULE_KEYS.items():
        if config.get(key) is not None and (not _is_int(config[key]) or config[key] < minimum):
            raise bad(key, f"an integer >= {minimum}")
    experts = next(config[k] for k in spec.num_experts_keys if config.get(k) is not None)
    top_k = next((config[k] for k in spec.top_k_keys if config.get(k) is not None), None)
    if top_k is not None and top_k > experts:
        raise ConfigError(f"{path}: {spec.top_k_keys[0]!r} ({top_k}) must be <= the number of routed experts "
                          f"({experts}); fix config.json")
    for key in ("dtype", "torch_dtype"):
        if config.get(key) is not None and config[key] not in _FLOAT_DTYPES:
            raise bad(key, f"one of {', '.join(_FLOAT_DTYPES)}")
    layers = config.get("mlp_only_layers")
    if layers is not None and (not isinstance(layers, list) or not all(_is_int(v) and v >= 0 for v in layers)):
        raise bad("mlp_only_layers", "a list of layer indices")


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{pattern}$")


def check_family(family: str) -> str:
    """`family` itself if it is one of FAMILIES, else ConfigError."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown expert family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def _hub_keys(block: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> dict[str, str]:
    base = f"model.layers.{{layer}}.{block}.experts.{{expert}}"
    return {"gate": f"{base}.{gate}.weight", "up": f"{base}.{up}.weight", "down": f"{base}.{down}.weight"}


def _fused_keys(block: str = "mlp") -> dict[str, str]:
    base = f"model.layers.{{layer}}.{block}.experts"
    return {"gate_up": f"{base}.gate_up_proj", "down": f"{base}.down_proj"}


_ROUTER = ("routers", r"\.(mlp|block_sparse_moe)\.gate\.(weight|bias|e_score_correction_bias)$")
_DENSE_MLP = ("dense_mlps", r"\.mlp\.(gate|up|down)_proj\.(weight|bias)$")
_EXPERT_EXTRAS = ("expert_extras", r"\.experts\.")  # e.g. biases or quantization scales next to routed weights
_QWEN = dict(expert_size_keys=("moe_intermediate_size",), top_k_keys=("num_experts_per_tok",),
             per_expert_keys=_hub_keys("mlp"), fused_keys=_fused_keys(), moe_rule=_qwen_rule)
_DEEPSEEK = dict(num_experts_keys=("n_routed_experts",), expert_size_keys=("moe_intermediate_size",),
                 top_k_keys=("num_experts_per_tok",), per_expert_keys=_hub_keys("mlp"), fused_keys=_fused_keys(),
                 moe_rule=_deepseek_rule,
                 untouched_patterns=(("shared_experts", r"\.mlp\.shared_experts\."), _ROUTER, _DENSE_MLP,
                                     _EXPERT_EXTRAS))

_SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(model_type="qwen2_moe", name="Qwen2-MoE", num_experts_keys=("num_experts",), **_QWEN,
             untouched_patterns=(("shared_experts", r"\.mlp\.shared_expert\."),
                                 ("shared_expert_gate", r"\.mlp\.shared_expert_gate\."), _ROUTER, _DENSE_MLP,
                                 _EXPERT_EXTRAS)),
    # transformers 5.x writes num_local_experts for Qwen3-MoE; hub configs say num_experts.
    ArchSpec(model_type="qwen3_moe", name="Qwen3-MoE", num_experts_keys=("num_experts", "num_local_experts"),
             **_QWEN, untouched_patterns=(_ROUTER, _DENSE_MLP, _EXPERT_EXTRAS)),
    ArchSpec(model_type="olmoe", name="OLMoE", num_experts_keys=("num_experts", "num_local_experts"),
             top_k_keys=("num_experts_per_tok",), expert_size_keys=("intermediate_size",),
             per_expert_keys=_hub_keys("mlp"), fused_keys=_fused_keys(),
             untouched_patterns=(_ROUTER, _EXPERT_EXTRAS)),
    # Mixtral: hub files use block_sparse_moe + w1 (gate) / w3 (up) / w2 (down); transformers 5.x renames the
    # block to `mlp` in memory (mlp.gate = router, mlp.experts.gate_up_proj / down_proj).
    ArchSpec(model_type="mixtral", name="Mixtral", num_experts_keys=("num_local_experts", "num_experts"),
             top_k_keys=("num_experts_per_tok",), expert_size_keys=("intermediate_size",),
             per_expert_keys=_hub_keys("block_sparse_moe", gate="w1", up="w3", down="w2"),
             fused_keys=_fused_keys("mlp"), untouched_patterns=(_ROUTER, _EXPERT_EXTRAS)),
    ArchSpec(model_type="deepseek_v2", name="DeepSeek-V2", **_DEEPSEEK),
    ArchSpec(model_type="deepseek_v3", name="DeepSeek-V3", **_DEEPSEEK),
)
REGISTRY: dict[str, ArchSpec] = {spec.model_type: spec for spec in _SPECS}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def get_arch(config: dict[str, Any]) -> ArchSpec:
    """The ArchSpec for config.json's `model_type`; UnsupportedArchitectureError if it is not registered."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    return REGISTRY[model_type]
