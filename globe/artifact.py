"""FitResult <-> directory: banks.safetensors (tensors, metadata in the header) + globe_config.json.

Codes are stored sparse (CSR: indptr, indices, values). Every file is written atomically (globe.core.files:
temp file in the same directory, fsync, rename), so a crash leaves either the previous or the new complete file.
`check_compatible` is the one check that an artifact fits a model (a checkpoint directory or a loaded model).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from globe.core.files import atomic_write, atomic_write_text  # noqa: F401  (re-exported)
from globe.core.result import FamilyFit, FitResult
from globe.errors import ArtifactError
from globe.fit.config import FitConfig
from globe.io.arch import FAMILIES
from globe.io.model import ModelShape, checkpoint_shape

FORMAT_VERSION = 1
BANKS_FILE = "banks.safetensors"
CONFIG_FILE = "globe_config.json"


def codes_to_csr(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense codes [N, m] -> indptr [N+1] int64, indices [nnz] int32, values [nnz] fp32."""
    mask = codes != 0
    indptr = torch.zeros(codes.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = mask.sum(1).cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    return {"indptr": indptr, "indices": cols.to(torch.int32), "values": codes[rows, cols].float().contiguous()}


def csr_to_codes(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    codes = torch.zeros(n, m, dtype=torch.float32)
    codes[rows, indices.long()] = values.float()
    return codes


def family_tensors(fam: FamilyFit, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    f = fam.family
    out = {f"{f}.bank": fam.bank.to(dtype), f"{f}.adapters": fam.adapters.to(dtype),
           f"{f}.scales": fam.scales.float(), f"{f}.ids": fam.ids.to(torch.int32)}
    out.update({f"{f}.codes.{k}": v for k, v in codes_to_csr(fam.codes.cpu()).items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def config_document(result: FitResult) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "source": result.source, "config": result.config.to_dict(),
            "families": {n: {"phi": f.phi, **f.shape} for n, f in result.families.items()},
            "params": result.params, "metrics": result.metrics, "timings": result.timings,
            "history": {n: f.history for n, f in result.families.items()}}


def save(result: FitResult, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the artifact directory (banks.safetensors + globe_config.json); returns its path."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ArtifactError(f"output directory {out} is not writable: choose another -o")
    tensors: dict[str, torch.Tensor] = {}
    for fam in result.families.values():
        tensors.update(family_tensors(fam, dtype))
    doc = config_document(result)
    # Both files carry the same id (a hash of the config document), so a crash between the two renames, which
    # leaves a new banks file beside an old config, is detected by load() instead of mixing two fits.
    doc["artifact_id"] = hashlib.sha256(json.dumps(doc, sort_keys=True, default=float).encode()).hexdigest()[:16]
    meta = {"format_version": str(FORMAT_VERSION), "families": ",".join(result.families),
            "artifact_id": doc["artifact_id"], **{f"phi.{n}": f.phi for n, f in result.families.items()}}
    atomic_write(out / BANKS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write_text(out / CONFIG_FILE, json.dumps(doc, indent=1, default=float))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} not found: not a GloBE artifact directory (run `globe fit` first)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = int(doc.get("format_version", -1))
    if version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"{path} has format_version {version}; this globe reads versions 1..{FORMAT_VERSION}"
                            + (": upgrade globe" if version > FORMAT_VERSION else ""))
    return doc


def check_pair(out: Path, doc: dict[str, Any]) -> None:
    """ArtifactError if banks.safetensors and globe_config.json were written by different saves (artifacts
    written before ids existed have none and pass)."""
    with safe_open(str(out / BANKS_FILE), "pt") as fh:
        banks_id = (fh.metadata() or {}).get("artifact_id")
    if banks_id is not None and doc.get("artifact_id") is not None and banks_id != doc["artifact_id"]:
        raise ArtifactError(f"{out / BANKS_FILE} and {out / CONFIG_FILE} come from different fits (a write was "
                            "interrupted?): re-run `globe fit --resume` (or `--overwrite`) into this directory")


def load(out: str | Path) -> FitResult:
    """Read an artifact directory back into a FitResult, validating versions and shapes."""
    out = Path(out)
    doc = _read_json(out / CONFIG_FILE)
    try:
        tensors = load_file(str(out / BANKS_FILE))
    except FileNotFoundError:
        raise ArtifactError(f"{out / BANKS_FILE} not found: the artifact is incomplete") from None
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{out / BANKS_FILE} is corrupt or truncated ({exc}): re-run `globe fit`") from None
    check_pair(out, doc)
    families = {}
    for name, info in doc["families"].items():
        families[name] = _family_from_tensors(name, info, tensors, doc["metrics"].get(name, {}), out,
                                              doc.get("history", {}).get(name))
    return FitResult(families=families, config=FitConfig.from_dict(doc["config"]), source=doc.get("source", {}),
                     timings=doc.get("timings", {}))


def check_compatible(result: FitResult, model: ModelShape | str | Path) -> None:
    """ArtifactError unless `result` fits `model`, the one place this is decided: same architecture, families
    among gate/up/down (exactly those a patched model factors), and per family p x d and (layer, expert) ids
    covering exactly the model's MoE layers x experts. `model`: a ModelShape (globe.io.model_shape of a loaded
    model) or a checkpoint directory (its config and safetensors headers only: fails before any model is loaded).
    """
    shape = model if isinstance(model, ModelShape) else checkpoint_shape(model)
    where, hint = shape.name, "fit the artifact on this model"
    fitted = result.source.get("model_type")
    if fitted and fitted != shape.model_type:
        raise ArtifactError(f"artifact was fitted on a {fitted} model but {where} is {shape.model_type}: {hint}")
    unknown = sorted(set(result.families) - set(FAMILIES))
    if unknown or not result.families:
        raise ArtifactError(f"artifact families {sorted(result.families)} are not a subset of {FAMILIES}")
    if shape.factored is not None and set(shape.factored) != set(result.families):
        raise ArtifactError(f"{where} is patched and factors {list(shape.factored)} but the artifact holds "
                            f"{sorted(result.families)}; pass the artifact the model was patched with")
    want = {(layer, e) for layer in shape.moe_layers for e in range(shape.num_experts)}
    for name, fam in result.families.items():
        s = fam.shape
        dims = (shape.d, shape.p) if name == "down" else (shape.p, shape.d)
        if (s["p"], s["d"]) != dims:
            raise ArtifactError(f"artifact does not match {where}: family {name} has p={s['p']} d={s['d']}, "
                                f"{where}'s experts need p={dims[0]} d={dims[1]}; {hint}")
        have = [(int(layer), int(e)) for layer, e in fam.ids.tolist()]
        if set(have) != want or len(have) != len(want):
            have_e = 1 + max((e for _, e in have), default=-1)
            raise ArtifactError(f"artifact does not match {where}: family {name} covers MoE layers "
                                f"{sorted({layer for layer, _ in have})} x {have_e} experts, {where} has "
                                f"{shape.moe_layers} x {shape.num_experts}; {hint}")


def _family_from_tensors(name: str, info: dict, tensors: dict, metrics: dict, out: Path,
                         history: dict | None = None) -> FamilyFit:
    keys = ["bank", "adapters", "scales", "ids", "codes.indptr", "codes.indices", "codes.values"]
    missing = [f"{name}.{k}" for k in keys if f"{name}.{k}" not in tensors]
    if missing:
        raise ArtifactError(f"{out / BANKS_FILE} lacks tensor(s) {', '.join(missing)}")
    t = {k: tensors[f"{name}.{k}"] for k in keys}
    n, p, d, m, r = info["N"], info["p"], info["d"], info["m"], info["r"]
    expect = {"bank": (m, r, d), "adapters": (n, p, r), "scales": (n,), "ids": (n, 2), "codes.indptr": (n + 1,)}
    for k, shape in expect.items():
        if tuple(t[k].shape) != shape:
            raise ArtifactError(f"{out / BANKS_FILE}: tensor {name}.{k} has shape {tuple(t[k].shape)}, "
                                f"expected {shape} from {CONFIG_FILE}")
    if int(t["codes.indptr"][-1]) != t["codes.indices"].numel() or (t["codes.indices"].numel() and
                                                                      int(t["codes.indices"].max()) >= m):
        raise ArtifactError(f"{out / BANKS_FILE}: sparse codes of {name} are inconsistent")
    return build_family(name, t, info["phi"], metrics, history)


def build_family(name: str, t: dict[str, torch.Tensor], phi: str, metrics: dict,
                 history: dict | None = None) -> FamilyFit:
    """FamilyFit from its stored tensors (keys without the family prefix, codes in CSR form)."""
    codes = csr_to_codes(t["codes.indptr"], t["codes.indices"], t["codes.values"], t["bank"].shape[0])
    return FamilyFit(family=name, bank=t["bank"], codes=codes, adapters=t["adapters"], scales=t["scales"],
                     ids=t["ids"].long(), phi=phi, metrics=metrics, history=history or {})
