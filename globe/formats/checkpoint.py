"""The compressed-checkpoint format: what `save_pretrained` of a GloBE-patched model writes, and how it reads back.

    config.json        the model's config plus `quantization_config` (quant_document: quant_method "globe",
                       format_version FORMAT_VERSION, per family m / r / code width k / phi, runtime mode, cache
                       budget, dtypes; optional `ranks` {layer: r_l} for a family whose layers' ranks differ, r
                       their maximum: that layer's adapters are [E, out, r_l] and it uses bank[:, :r_l]; an entry
                       without `ranks` is every layer at r, so older checkpoints read unchanged); read with
                       read_quant / check_quant
    model.safetensors  per MoE layer, under the routed-experts module's path: state_key(kind, family) for the GloBE
                       tensors (bank once, under the first MoE layer, the other layers tie to it; adapters, padded
                       code values / indices per layer) and dense_key(family) for untouched projections
    globe_config.json  provenance of the fit (globe.formats.artifact's document, without tensors)

Shapes are not stored apart from the tensors: family_shapes derives each GloBE tensor's shape from one family's
entry (m, r, k) and the model's dimensions, and family_from_layers reads a FamilyFit back from the tensors
themselves. Checkpoints of format 1 (MARKER_FILE + WEIGHTS_FILE + an artifact) are read only (read_marker).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from globe.core.result import FamilyFit
from globe.errors import ArtifactError
from globe.io.arch import FAMILIES, ArchSpec

QUANT_METHOD = "globe"
FORMAT_VERSION = 2                     # of `quantization_config` and the state layout; 1 = the marker-file format
MIN_VERSION = 2                        # the oldest `quantization_config` version read (1 had no such entry)
MODES: tuple[str, ...] = ("cached", "factored", "dense")   # runtime modes a checkpoint may name
STATE_KINDS: tuple[str, ...] = ("bank", "adapters", "code_values", "code_indices")    # GloBE-owned tensors
GLOBE_STATE: tuple[str, ...] = tuple(f"{kind}." for kind in STATE_KINDS)              # their key prefixes

MARKER_VERSION = 1                     # of the format-1 marker file, read only
MARKER_FILE = "globe_compressed.json"  # format 1
WEIGHTS_FILE = "globe_model.safetensors"   # format 1


def state_key(kind: str, family: str, prefix: str = "") -> str:
    """Key of one GloBE tensor of a routed-experts module: `bank.gate`, or `{prefix}.bank.gate` under a prefix."""
    if kind not in STATE_KINDS:
        raise ValueError(f"unknown GloBE state kind {kind!r}; expected one of {STATE_KINDS}")
    return f"{prefix}.{kind}.{family}" if prefix else f"{kind}.{family}"


def dense_key(family: str, prefix: str = "") -> str:
    """Key of an untouched (dense) projection [E, out, in] beside the GloBE tensors: `down_proj`, ..."""
    return f"{prefix}.{family}_proj" if prefix else f"{family}_proj"


def is_globe_state(key: str) -> bool:
    """Whether a key relative to a routed-experts module names a GloBE-owned tensor."""
    return key.startswith(GLOBE_STATE)


def family_entry(bank: torch.Tensor, code_indices: torch.Tensor, phi: str,
                 ranks: dict[int, int] | None = None) -> dict[str, Any]:
    """One family's `quantization_config.families` entry, read from its tensors: bank [m, r, in], codes [E, k];
    `ranks` {layer: r_l} is recorded only when the layers' ranks differ from r."""
    out = {"m": int(bank.shape[0]), "r": int(bank.shape[1]), "k": int(code_indices.shape[1]), "phi": phi}
    if ranks and any(r != out["r"] for r in ranks.values()):
        out["ranks"] = {str(layer): int(r) for layer, r in sorted(ranks.items())}
    return out


def layer_rank(info: dict[str, Any], layer: int) -> int:
    """The rank of MoE layer `layer` in a family's quantization_config entry (its r unless `ranks` says so)."""
    return int((info.get("ranks") or {}).get(str(layer), info["r"]))


def quant_document(families: dict[str, dict[str, Any]], mode: str, cache_bytes: int | None,
                   max_gathered_pairs: int, factor_dtype: torch.dtype | str | None,
                   model_dtype: torch.dtype | str | None, extra: dict[str, Any] | None = None,
                   version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The `quantization_config` entry of config.json (writer); `extra` keys are kept but never override ours."""
    def name(dtype: torch.dtype | str | None) -> str | None:
        return None if dtype is None else str(dtype).removeprefix("torch.")
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


def family_shapes(family: str, info: dict[str, Any], num_experts: int, p: int, d: int,
                  layer: int | None = None) -> dict[str, tuple]:
    """Shapes of one family's GloBE tensors in MoE layer `layer`, from its quantization_config entry (m, r, k,
    ranks): bank [m, r, in], adapters [E, out, r_l], code values / indices [E, k]; (in, out) = (d, p), or (p, d)
    for down."""
    out_dim, in_dim = (d, p) if family == "down" else (p, d)
    m, r, k = info["m"], info["r"], info["k"]
    r_l = r if layer is None else layer_rank(info, layer)
    return {"bank": (m, r, in_dim), "adapters": (num_experts, out_dim, r_l), "code_values": (num_experts, k),
            "code_indices": (num_experts, k)}


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
    return next((c for c in candidates if state_key("adapters", family, c) in keys), candidates[0])


def family_from_layers(name: str, spec: ArchSpec, config: dict, tensors: open_weights, doc: dict) -> FamilyFit:
    """One family's FitResult tensors gathered from the per-layer GloBE state of a compressed checkpoint (fp32,
    exactly the stored values; the z-score scales are folded into the adapters, so they read 1)."""
    layers = spec.moe_layers(config)
    adapters, codes, ids, ranks = [], [], [], []
    bank = tensors[state_key("bank", name, stored_prefix(spec, min(layers), tensors.where, name))].float()
    for layer in layers:
        prefix = stored_prefix(spec, layer, tensors.where, name)
        index = tensors[state_key("code_indices", name, prefix)]
        values = tensors[state_key("code_values", name, prefix)].float()
        dense = torch.zeros(index.shape[0], bank.shape[0]).scatter_add_(1, index.long(), values)   # [E, m]
        layer_adapters = tensors[state_key("adapters", name, prefix)].float()          # [E, out, r_l]
        ranks.append(int(layer_adapters.shape[-1]))
        adapters.append(torch.nn.functional.pad(layer_adapters, (0, bank.shape[1] - ranks[-1])))   # to r_max
        codes.append(dense)
        ids.append(torch.tensor([[layer, e] for e in range(index.shape[0])]))
    n = sum(a.shape[0] for a in adapters)
    return FamilyFit(family=name, bank=bank, codes=torch.cat(codes), adapters=torch.cat(adapters),
                     scales=torch.ones(n), ids=torch.cat(ids), phi=doc["families"].get(name, {}).get("phi", "identity"),
                     metrics=doc.get("metrics", {}).get(name, {}), history=doc.get("history", {}).get(name, {}),
                     ranks=tuple(ranks) if len(set(ranks)) > 1 or ranks[0] != bank.shape[1] else None)
