"""The compressed-checkpoint format: what `save_pretrained` of a GloBE-patched model writes, and how it reads back.

    config.json        the model's config plus `quantization_config` (quant_document: quant_method "globe",
                       format_version FORMAT_VERSION, per family m / r / code width k / phi, runtime mode, cache
                       budget, dtypes; optional `ranks` {layer: r_l} for a family whose layers' ranks differ, r
                       their maximum: that layer's adapters are [E, out, r_l] and it uses bank[:, :r_l]; an entry
                       without `ranks` is every layer at r, so older checkpoints read unchanged; optional `quant`
                       {part: {bits, group, method}} for a bank / adapters / residual stored packed); read with
                       read_quant / check_quant
    model.safetensors  per MoE layer, under the routed-experts module's path: state_key(kind, family) for the GloBE
                       tensors (bank once, under the first MoE layer, the other layers tie to it; adapters, padded
                       code values / indices per layer) and dense_key(family) for untouched projections; a packed
                       part as packed_key(kind, family, buffer): `bank.gate.codes` (uint8, the integer codes
                       bit-packed as globe.quant.packing packs them), `bank.gate.scales`, `bank.gate.zeros` (fp16,
                       one per group of `group` entries along the last axis); packed_shapes gives their shapes;
                       a family's residuals R_e = W_e - A_e tilde_B_e [E, out, in] (per layer, always packed):
                       `residual.gate.codes` / `.scales` / `.zeros`
    globe_config.json  provenance of the fit (globe.formats.artifact's document, without tensors)

Shapes are not stored apart from the tensors: family_shapes derives each GloBE tensor's shape from one family's
entry (m, r, k) and the model's dimensions, and family_from_layers reads a FamilyFit back from the tensors
themselves. Checkpoints of format 1 (MARKER_FILE + WEIGHTS_FILE + an artifact) are read only (read_marker).

Versions of `quantization_config` (format_version_for writes the lowest that holds a checkpoint): 2, every layer
at rank r and nothing packed; 3, a rank per layer and/or packed parts (a globe that reads only 2 refuses it in one
line, where it would otherwise fail on a shape). Version 2 checkpoints with `ranks` (written before 3 existed) read
as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from globe.core.result import FamilyFit
from globe.errors import ArtifactError
from globe.io.arch import FAMILIES, ArchSpec, config_value
from globe.quant.config import BITS
from globe.quant.packing import pack_bits, packed_bytes
from globe.quant.tensor import QuantizedTensor, concat_rows

QUANT_METHOD = "globe"
FORMAT_VERSION = 3                     # of `quantization_config` and the state layout; 1 = the marker-file format
MIN_VERSION = 2                        # the oldest `quantization_config` version read (1 had no such entry)
PACKED_KINDS: tuple[str, ...] = ("bank", "adapters", "residual")   # the parts that may be stored packed (a
                                                                    # residual is always packed)
PACKED_BUFFERS: tuple[str, ...] = ("codes", "scales", "zeros")  # a packed part's tensors (key suffixes)
MODES: tuple[str, ...] = ("cached", "factored", "dense")   # runtime modes a checkpoint may name
STATE_KINDS: tuple[str, ...] = ("bank", "adapters", "code_values", "code_indices", "residual")   # GloBE-owned
GLOBE_STATE: tuple[str, ...] = tuple(f"{kind}." for kind in STATE_KINDS)              # their key prefixes

MARKER_VERSION = 1                     # of the format-1 marker file, read only
MARKER_FILE = "globe_compressed.json"  # format 1
WEIGHTS_FILE = "globe_model.safetensors"   # format 1


def state_key(kind: str, family: str, prefix: str = "") -> str:
    """Key of one GloBE tensor of a routed-experts module: `bank.gate`, or `{prefix}.bank.gate` under a prefix."""
    if kind not in STATE_KINDS:
        raise ValueError(f"unknown GloBE state kind {kind!r}; expected one of {STATE_KINDS}")
    return f"{prefix}.{kind}.{family}" if prefix else f"{kind}.{family}"


def packed_key(kind: str, family: str, buffer: str, prefix: str = "") -> str:
    """Key of one tensor of a packed part: `bank.gate.codes`, `{prefix}.adapters.up.scales`, ..."""
    if kind not in PACKED_KINDS or buffer not in PACKED_BUFFERS:
        raise ValueError(f"no packed tensor {kind}.{buffer}; expected {PACKED_KINDS} x {PACKED_BUFFERS}")
    return f"{state_key(kind, family, prefix)}.{buffer}"


def dense_key(family: str, prefix: str = "") -> str:
    """Key of an untouched (dense) projection [E, out, in] beside the GloBE tensors: `down_proj`, ..."""
    return f"{prefix}.{family}_proj" if prefix else f"{family}_proj"


def is_globe_state(key: str) -> bool:
    """Whether a key relative to a routed-experts module names a GloBE-owned tensor."""
    return key.startswith(GLOBE_STATE)


def family_entry(bank: Any, code_indices: torch.Tensor, phi: str, ranks: dict[int, int] | None = None,
                 quant: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One family's `quantization_config.families` entry, read from its tensors: bank [m, r, in] (anything with a
    shape), codes [E, k]; `ranks` {layer: r_l} is recorded only when the layers' ranks differ from r, `quant`
    {part: {bits, group, method}} only for packed parts."""
    out = {"m": int(bank.shape[0]), "r": int(bank.shape[1]), "k": int(code_indices.shape[1]), "phi": phi}
    if ranks and any(r != out["r"] for r in ranks.values()):
        out["ranks"] = {str(layer): int(r) for layer, r in sorted(ranks.items())}
    if quant:
        out["quant"] = {part: dict(meta) for part, meta in sorted(quant.items())}
    return out


def format_version_for(families: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds these families: 3 with a rank per layer or a packed part, else 2."""
    return 3 if any(v.get("ranks") or v.get("quant") for v in families.values()) else 2


def layer_rank(info: dict[str, Any], layer: int) -> int:
    """The rank of MoE layer `layer` in a family's quantization_config entry (its r unless `ranks` says so)."""
    return int((info.get("ranks") or {}).get(str(layer), info["r"]))


def quant_document(families: dict[str, dict[str, Any]], mode: str, cache_bytes: int | None,
                   max_gathered_pairs: int, factor_dtype: torch.dtype | str | None,
                   model_dtype: torch.dtype | str | None, extra: dict[str, Any] | None = None,
                   version: int | None = None) -> dict[str, Any]:
    """The `quantization_config` entry of config.json (writer); `extra` keys are kept but never override ours.
    version: default the lowest that holds `families` (format_version_for)."""
    def name(dtype: torch.dtype | str | None) -> str | None:
        return None if dtype is None else str(dtype).removeprefix("torch.")
    version = format_version_for(families) if version is None else version
    out = {"quant_method": QUANT_METHOD, "format_version": version, "families": families, "mode": mode,
           "cache_bytes": cache_bytes, "max_gathered_pairs": max_gathered_pairs,
           "factor_dtype": name(factor_dtype), "model_dtype": name(model_dtype)}
    return {**(extra or {}), **out}


def check_quant(version: int, mode: str, families: dict[str, dict[str, Any]]) -> None:
    """ArtifactError unless a `quantization_config` of this version, mode and families can be read."""
    if version > FORMAT_VERSION or version < MIN_VERSION:
        raise ArtifactError(f"GloBE checkpoint has format_version {version}; this globe reads "
                            f"{MIN_VERSION}..{FORMAT_VERSION}: upgrade globe")
    if mode not in MODES:
        raise ArtifactError(f"quantization_config.mode must be one of {', '.join(MODES)}, not {mode!r}")
    unknown = sorted(set(families) - set(FAMILIES))
    missing = [f"{f}.{k}" for f, v in families.items() for k in ("m", "r", "k") if k not in v]
    if unknown or missing or not families:
        raise ArtifactError(f"quantization_config.families {families} must map a subset of {FAMILIES} "
                            f"to m, r, k (missing {missing}): re-export the checkpoint")
    for f, v in families.items():
        ranks = v.get("ranks")
        if ranks is not None and (not isinstance(ranks, dict) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= v["r"] for r in ranks.values())):
            raise ArtifactError(f"quantization_config.families.{f}.ranks must map layers to ranks in 1..{v['r']}, "
                                f"got {ranks!r}: re-export the checkpoint")
        problem = quant_problem(v.get("quant"))
        if problem:
            raise ArtifactError(f"quantization_config.families.{f}.quant{problem}: re-export the checkpoint")


def quant_problem(quant: Any) -> str | None:
    """What is wrong with a family's `quant` entry ({part: {bits, group, method}}), as the rest of a sentence that
    starts with its key; None when it is absent or right."""
    if quant is None:
        return None
    if not isinstance(quant, dict) or not set(quant) <= set(PACKED_KINDS):
        return f" must map {' / '.join(PACKED_KINDS)} to {{bits, group, method}} (got {quant!r})"
    for part, meta in quant.items():
        if not isinstance(meta, dict) or set(meta) - {"bits", "group", "method"}:
            return f".{part} must be an object with bits, group and method (got {meta!r})"
        bits, group, method = meta.get("bits"), meta.get("group"), meta.get("method")
        if not _is_int(bits) or bits not in BITS:
            return f".{part}.bits must be one of {', '.join(map(str, BITS))} (got {bits!r})"
        if not _is_int(group) or not 1 <= group <= 1 << 20:
            return f".{part}.group must be an integer in 1..1048576 (got {group!r})"
        if method is not None and not isinstance(method, str):
            return f".{part}.method must be null or a string (got {method!r})"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def family_shapes(family: str, info: dict[str, Any], num_experts: int, p: int, d: int,
                  layer: int | None = None) -> dict[str, tuple]:
    """Shapes of one family's GloBE tensors in MoE layer `layer`, from its quantization_config entry (m, r, k,
    ranks): bank [m, r, in], adapters [E, out, r_l], code values / indices [E, k], residual [E, out, in] (stored
    only when its `quant` lists one); (in, out) = (d, p), or (p, d) for down."""
    out_dim, in_dim = (d, p) if family == "down" else (p, d)
    m, r, k = info["m"], info["r"], info["k"]
    r_l = r if layer is None else layer_rank(info, layer)
    out = {"bank": (m, r, in_dim), "adapters": (num_experts, out_dim, r_l), "code_values": (num_experts, k),
           "code_indices": (num_experts, k)}
    if "residual" in (info.get("quant") or {}):
        out["residual"] = (num_experts, out_dim, in_dim)
    return out


def packed_shapes(shape: tuple[int, ...], meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{buffer: (shape, safetensors dtype)} of a part of shape `shape` stored packed with meta's bits and group:
    codes U8 [ceil(numel * bits / 8)], scales / zeros F16 [*shape[:-1], ceil(shape[-1] / group)]."""
    groups = -(-shape[-1] // meta["group"])
    numel = 1
    for s in shape:
        numel *= s
    return {"codes": ((packed_bytes(numel, meta["bits"]),), "U8"), "scales": ((*shape[:-1], groups), "F16"),
            "zeros": ((*shape[:-1], groups), "F16")}


def read_quant(path: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` of a directory's config.json: None when there is none or it is unreadable,
    ArtifactError when it is not an object."""
    path = Path(path)
    try:
        quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(quant, dict):
        raise ArtifactError(f"{path / 'config.json'}: quantization_config must be an object (got {quant!r}); "
                            f"re-export the checkpoint or remove the key")
    return quant


def is_compressed(path: str | Path) -> bool:
    """Whether `path` is a GloBE compressed checkpoint (config.json with quant_method "globe", or format 1)."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        return True
    quant = read_quant(path)
    return quant is not None and quant.get("quant_method") == QUANT_METHOD


def read_marker(path: Path) -> dict:
    """The marker document of a format-1 checkpoint, checked (ArtifactError naming the file and key)."""
    if not (path / MARKER_FILE).is_file():
        raise ArtifactError(f"{path} is not a GloBE compressed checkpoint (no {MARKER_FILE}); "
                            f"write one with `globe export OUT --model MODEL_DIR -o {path}`")
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path / MARKER_FILE} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(marker, dict):
        raise ArtifactError(f"{path / MARKER_FILE} must hold a JSON object: re-export the checkpoint")
    if marker.get("format_version") not in range(1, MARKER_VERSION + 1):
        raise ArtifactError(f"{path / MARKER_FILE} has format_version {marker.get('format_version')!r}; this globe "
                            f"reads 1..{MARKER_VERSION}: upgrade globe")
    for key in ("dtype", "globe_dtype"):
        if (key == "dtype" or key in marker) and not isinstance(getattr(torch, str(marker[key]), None), torch.dtype):
            raise ArtifactError(f"{path / MARKER_FILE}: {key} {marker[key]!r} is not a torch dtype; re-export "
                                f"the checkpoint")
    if not isinstance(marker.get("weights"), str) or Path(marker["weights"]).name != marker["weights"]:
        raise ArtifactError(f"{path / MARKER_FILE}: weights must name a file of {path} (got "
                            f"{marker.get('weights')!r}); re-export the checkpoint")
    return marker


class open_weights:
    """{key: tensor} reader over every *.safetensors file of a directory (lazy, one file handle each)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open
        self.files = [safe_open(str(f), "pt") for f in sorted(path.glob("*.safetensors"))]
        if not self.files:
            raise ArtifactError(f"no model.safetensors in {path}: the checkpoint is incomplete; re-export it")
        self.where = {k: fh for fh in self.files for k in fh.keys()}

    def __enter__(self) -> "open_weights":
        return self

    def __exit__(self, *exc) -> None:
        self.files.clear()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ArtifactError(f"compressed checkpoint lacks tensor {key}; re-export it")
        return self.where[key].get_tensor(key)


def stored_prefix(spec: Any, layer: int, keys: Any, family: str) -> str:
    """Where one layer's GloBE tensors are stored: under the loaded module's path (model.layers.3.mlp.experts) or,
    where transformers writes hub names, under the hub experts prefix (model.layers.3.block_sparse_moe.experts)."""
    candidates = [spec.experts_path(layer)]
    if spec.per_expert_keys:
        template = next(iter(spec.per_expert_keys.values()))
        candidates.append(template.split(".{expert}")[0].format(layer=layer))
    return next((c for c in candidates if state_key("adapters", family, c) in keys
                 or packed_key("adapters", family, "codes", c) in keys), candidates[0])


def read_part(tensors: open_weights, kind: str, family: str, prefix: str, shape: tuple[int, ...],
              meta: dict[str, Any] | None) -> tuple[torch.Tensor, QuantizedTensor | None]:
    """One stored part (bank, adapters or residual) of a family: (fp32 values, the QuantizedTensor when it is
    packed)."""
    if meta is None:
        return tensors[state_key(kind, family, prefix)].float(), None
    parts = {b: tensors[packed_key(kind, family, b, prefix)] for b in PACKED_BUFFERS}
    try:
        qt = QuantizedTensor.from_tensors({f"p.{b}": t for b, t in parts.items()}, "p",
                                          {"shape": list(shape), "bits": meta["bits"], "group": meta["group"]})
    except Exception as exc:   # a part that does not fit its record: name it
        raise ArtifactError(f"compressed checkpoint: packed tensor {state_key(kind, family, prefix)} does not fit "
                            f"quantization_config ({exc}); re-export it") from None
    return qt.dequantize(), qt


def family_from_layers(name: str, spec: ArchSpec, config: dict, tensors: open_weights, doc: dict) -> FamilyFit:
    """One family's FitResult tensors gathered from the per-layer GloBE state of a compressed checkpoint (fp32,
    exactly the stored values; the z-score scales are folded into the adapters, so they read 1). Packed parts are
    dequantized, and kept packed in FamilyFit.quant (the adapters only when every layer has rank r: the artifact
    stores quantized adapters at one rank)."""
    layers = spec.moe_layers(config)
    info = config["quantization_config"]["families"][name]
    quant = info.get("quant") or {}
    first = stored_prefix(spec, min(layers), tensors.where, name)
    num_experts = int(config_value(config, spec.num_experts_keys, spec.model_type))
    out_dim, in_dim = _dims(spec, config, name)
    bank, qbank = read_part(tensors, "bank", name, first, (info["m"], info["r"], in_dim), quant.get("bank"))
    adapters, codes, ids, ranks, qadapters, residuals = [], [], [], [], [], []
    for layer in layers:
        prefix = stored_prefix(spec, layer, tensors.where, name)
        index = tensors[state_key("code_indices", name, prefix)]
        values = tensors[state_key("code_values", name, prefix)].float()
        dense = torch.zeros(index.shape[0], bank.shape[0]).scatter_add_(1, index.long(), values)   # [E, m]
        shape = (num_experts, out_dim, layer_rank(info, layer))
        layer_adapters, qt = read_part(tensors, "adapters", name, prefix, shape, quant.get("adapters"))
        qadapters.append(qt)
        if "residual" in quant:
            residuals.append(read_part(tensors, "residual", name, prefix, (num_experts, out_dim, in_dim),
                                       quant["residual"])[1])
        ranks.append(int(layer_adapters.shape[-1]))
        adapters.append(torch.nn.functional.pad(layer_adapters, (0, bank.shape[1] - ranks[-1])))   # to r_max
        codes.append(dense)
        ids.append(torch.tensor([[layer, e] for e in range(index.shape[0])]))
    n = sum(a.shape[0] for a in adapters)
    packed = {"bank": qbank} if qbank is not None else {}
    if qadapters[0] is not None and all(r == bank.shape[1] for r in ranks):
        packed["adapters"] = QuantizedTensor.from_tensors(
            {"a.codes": pack_bits(torch.cat([q.integer_codes() for q in qadapters]), qadapters[0].bits),
             "a.scales": torch.cat([q.scales for q in qadapters]), "a.zeros": torch.cat([q.zeros for q in qadapters])},
            "a", {"shape": [n, out_dim, bank.shape[1]], "bits": qadapters[0].bits, "group": qadapters[0].group})
    if residuals:
        packed["residual"] = concat_rows(residuals)
    return FamilyFit(family=name, bank=bank, codes=torch.cat(codes), adapters=torch.cat(adapters),
                     scales=torch.ones(n), ids=torch.cat(ids), phi=doc["families"].get(name, {}).get("phi", "identity"),
                     metrics=doc.get("metrics", {}).get(name, {}), history=doc.get("history", {}).get(name, {}),
                     ranks=tuple(ranks) if len(set(ranks)) > 1 or ranks[0] != bank.shape[1] else None, quant=packed)


def _dims(spec: ArchSpec, config: dict, family: str) -> tuple[int, int]:
    """(out, in) of a family's expert weights from config.json: (p, d), or (d, p) for down."""
    p = int(config_value(config, spec.expert_size_keys, spec.model_type))
    d = int(config_value(config, spec.hidden_size_keys, spec.model_type))
    return (d, p) if family == "down" else (p, d)
