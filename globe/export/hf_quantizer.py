"""Hugging Face integration: `quant_method: "globe"` for transformers' from_pretrained / save_pretrained.

    import globe                                                   # registers the config class and the quantizer
    model = AutoModelForCausalLM.from_pretrained("compressed/", dtype=torch.bfloat16, device_map="cuda")
    model.save_pretrained("again/")                                # the same compressed format

A compressed checkpoint (its format: globe.formats.checkpoint) is what `save_pretrained` writes for a model patched
by apply_globe: config.json with a `quantization_config` (GlobeConfig: format version, per-family m / r / code
width k / phi / per-layer ranks, runtime mode, cache budget) and model.safetensors with the patched state dict: the family banks
once (under the first MoE layer's experts), per layer the adapters, padded sparse codes and the untouched dense projections (`down_proj` ...), and
everything outside the routed experts as transformers stores it.

A quantized fit's bank and adapters are stored packed (`bank.gate.codes` / `.scales` / `.zeros`, bits and group in
`families.{f}.quant`) and load into PackedTensor buffers (globe.runtime.packed), dequantized on use.

GlobeHfQuantizer, like the torchao / compressed-tensors quantizers, swaps every routed-experts module of the model
skeleton (meta device) for a GlobeExperts of the right shapes before the weights load, declares the banks of the
other layers as tied to the first one, and after loading puts one bank copy on each device that holds experts and
sets the runtime mode. Loaded tensors take the dtype asked for (`dtype=`); with the checkpoint's own dtype the
factors keep the dtype they were stored in.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from globe.errors import ArtifactError, NumericalError
from globe.formats.checkpoint import (FORMAT_VERSION, QUANT_METHOD, check_quant, family_shapes, quant_document,
                                      state_key)
from globe.formats.load_guard import GUARD, mark
from globe.formats.validate import validate_checkpoint, verify_content
from globe.export.provenance import keep_provenance
from globe.io.layout import ExpertsLayout
from globe.io.model import experts_modules, model_arch
from globe.runtime.apply import globe_modules, set_mode, share_banks
from globe.runtime.build import build_experts
from globe.runtime.experts import GlobeExperts
from globe.runtime.packed import PackedTensor

log = logging.getLogger(__name__)


class GlobeConfig(QuantizationConfigMixin):
    """`quantization_config` of a GloBE-compressed checkpoint (JSON round trip through to_dict / from_dict)."""

    def __init__(self, families: dict[str, dict[str, Any]] | None = None, mode: str = "cached",
                 cache_bytes: int | None = None, max_gathered_pairs: int = 16, factor_dtype: str | None = None,
                 model_dtype: str | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.families = {f: dict(v) for f, v in (families or {}).items()}
        self.mode = mode
        self.cache_bytes = cache_bytes
        self.max_gathered_pairs = int(max_gathered_pairs)
        self.factor_dtype, self.model_dtype = factor_dtype, model_dtype
        self.extra = {k: v for k, v in kwargs.items() if k != "quant_method"}
        self.post_init()

    def post_init(self) -> None:
        check_quant(self.format_version, self.mode, self.families)

    def to_dict(self) -> dict[str, Any]:
        """The document to write: its format_version is the lowest that holds the families (a checkpoint read as
        version 2 with ranks per layer is written back as 3)."""
        return quant_document(self.families, self.mode, self.cache_bytes, self.max_gathered_pairs, self.factor_dtype,
                              self.model_dtype, self.extra)


def _factor_dtype(config: GlobeConfig, model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype factors load in: the one asked for, or the stored one when the model loads in its stored dtype."""
    model_dtype = dtype or next(model.parameters()).dtype
    stored = getattr(torch, config.factor_dtype or "", None)
    stored_model = getattr(torch, config.model_dtype or "", None)
    return stored if isinstance(stored, torch.dtype) and model_dtype == stored_model else model_dtype


def _part(shape: tuple[int, ...], info: dict[str, Any], kind: str, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor | PackedTensor:
    """An uninitialised bank or adapters tensor of `shape`, or a PackedTensor when the checkpoint stores it packed."""
    meta = (info.get("quant") or {}).get(kind)
    if meta is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return PackedTensor(shape, meta["bits"], meta["group"], meta.get("method"), device=device)


def _skeleton_layer(module: nn.Module, layer: int, layout: ExpertsLayout, config: GlobeConfig,
                    banks: dict[str, nn.Parameter | PackedTensor], dtype: torch.dtype, first: bool) -> GlobeExperts:
    """A GlobeExperts with uninitialised tensors of the checkpoint's shapes, on the module's device (meta)."""
    num_experts, p, d = layout.dims(module)
    device = layout.device(module)
    codes, adapters, residuals = {}, {}, {}
    for family, info in config.families.items():
        shapes = family_shapes(family, info, num_experts, p, d, layer)
        codes[family] = (torch.zeros(shapes["code_indices"], dtype=torch.long, device=device),
                         torch.empty(shapes["code_values"], dtype=dtype, device=device))
        adapters[family] = _part(shapes["adapters"], info, "adapters", dtype, device)
        if "residual" in (info.get("quant") or {}):
            residuals[family] = _part(shapes["residual"], info, "residual", dtype, device)
    phis = {f: v.get("phi", "identity") for f, v in config.families.items()}
    shared = frozenset() if first else frozenset(f for f, b in banks.items() if isinstance(b, PackedTensor))
    return build_experts(module, layer, layout, banks, phis, codes, adapters, config.max_gathered_pairs, shared,
                         residuals)


def patch_skeleton(model: nn.Module, config: GlobeConfig, dtype: torch.dtype | None = None) -> None:
    """Swap the routed experts of a (meta) model skeleton for GlobeExperts; banks shared and declared tied."""
    spec, _ = model_arch(model)
    modules = experts_modules(model)
    first, layout = next(iter(modules.values())), spec.layout
    factor_dtype = _factor_dtype(config, model, dtype)
    num_experts, p, d = layout.dims(first)
    banks = {f: _part(family_shapes(f, v, num_experts, p, d)["bank"], v, "bank", factor_dtype, layout.device(first))
             for f, v in config.families.items()}
    banks = {f: b if isinstance(b, PackedTensor) else nn.Parameter(b) for f, b in banks.items()}
    for layer, module in modules.items():
        model.set_submodule(spec.experts_path(layer),
                            _skeleton_layer(module, layer, layout, config, banks, factor_dtype, layer == min(modules)))
    share_banks(model)
    owner = spec.experts_path(min(modules))
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is not None:                       # a packed bank is not tied: only its owner registers it
        tied.update({state_key("bank", f, spec.experts_path(layer)): state_key("bank", f, owner)
                     for layer in modules if layer != min(modules) for f in config.families
                     if not isinstance(banks[f], PackedTensor)})


def place_banks(model: nn.Module) -> None:
    """One bank per family per device: layers placed on another device than the loaded bank get a shared copy."""
    copies: dict[tuple[str, torch.device], nn.Parameter | PackedTensor] = {}
    for module in globe_modules(model).values():
        device = module.code_indices[module.factored[0]].device
        for family in module.factored:
            bank = module.bank[family]
            if isinstance(bank, PackedTensor):
                if bank.codes.device != device and not module.bank.is_stored(family):
                    copies.setdefault((family, device), _packed_copy(bank, device))
                    module.bank[family] = copies[(family, device)]
            elif bank.device != device:
                key = (family, device)
                copies.setdefault(key, nn.Parameter(bank.detach().to(device), requires_grad=bank.requires_grad))
                module.bank[family] = copies[key]


def _packed_copy(part: PackedTensor, device: torch.device) -> PackedTensor:
    """A copy of a packed bank on another device (for the layers placed there; not stored)."""
    return PackedTensor.from_quantized(part.quantized(), part.method, device)


def check_finite_factors(model: nn.Module) -> None:
    """NumericalError naming the first GloBE tensor (bank, adapters, codes) of a loaded model that holds NaN/Inf:
    plain from_pretrained checks what `globe.load_compressed` checks, where a damaged file would otherwise only
    show as NaN logits."""
    seen: set[int] = set()
    where = getattr(model.config, "_name_or_path", "") or "the checkpoint"
    shards = sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []
    where = str(shards[0]) if len(shards) == 1 else where              # the file to repair, when it is one
    for layer, module in globe_modules(model).items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if id(tensor) in seen or not tensor.is_floating_point():
                continue
            seen.add(id(tensor))
            if not bool(torch.isfinite(tensor).all()):
                raise NumericalError(f"GloBE tensor {name!r} of MoE layer {layer} in {where} holds NaN/Inf values; "
                                     f"the checkpoint is damaged, re-export or re-download it")


class GlobeHfQuantizer(HfQuantizer):
    """Loads GloBE-compressed checkpoints (pre-quantized only: fitting is `globe fit` / `globe compress`)."""

    requires_calibration = True
    quantization_config: GlobeConfig

    def __init__(self, quantization_config: GlobeConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype: torch.dtype | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self._dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        self._checkpoint_dir = Path(files[0]).parent if files else None
        if self._checkpoint_dir is not None:        # the whole checkpoint, before any tensor is used
            validate_checkpoint(self._checkpoint_dir)
        patch_skeleton(model, self.quantization_config, kwargs.get("dtype") or self._dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        place_banks(model)
        share_banks(model)
        check_finite_factors(model)
        if getattr(self, "_checkpoint_dir", None) is not None:   # the recorded content hash, before any use
            verify_content(self._checkpoint_dir, caller=False)
        where = Path(getattr(model.config, "_name_or_path", "") or "")
        if str(where) and where.is_dir():
            keep_provenance(model, where)          # save_pretrained writes globe_config.json and the tokenizer too
        set_mode(model, self.quantization_config.mode, cache_bytes=self.quantization_config.cache_bytes)
        mark(model.config)                         # save_pretrained writes the load guard again
        log.info("loaded GloBE checkpoint: %d MoE layers, families %s, %s mode", len(globe_modules(model)),
                 ", ".join(self.quantization_config.families), self.quantization_config.mode)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """The factors are ordinary parameters: fine-tuning (plain loops, Trainer, peft) trains them directly;
        packed (quantized) banks and adapters are frozen buffers, the code values and the rest still train."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Trainer may fine-tune the compressed model itself, without adapters on top."""
        return True


def unreplaced_experts(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts implementation GUARD names: reached only by a routed-experts module that the "globe" quantizer
    did not replace (its weights were never loaded), so it refuses instead of computing with them."""
    raise ArtifactError(f"{type(module).__name__} of a GloBE-compressed model was not replaced by GlobeExperts: load "
                        "the checkpoint with AutoModelForCausalLM.from_pretrained after `import globe`, or with "
                        "globe.load_compressed")


def register() -> None:
    """Register GlobeConfig, GlobeHfQuantizer and the load guard's experts implementation (globe.formats.load_guard)
    with transformers (idempotent; done on `import globe`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if GUARD not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(GUARD, unreplaced_experts)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(GlobeConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(GlobeHfQuantizer)


register()
