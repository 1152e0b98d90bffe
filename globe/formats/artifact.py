"""The artifact format: FitResult <-> directory of banks.safetensors (tensors, metadata in the header) +
globe_config.json (format_version FORMAT_VERSION; read back from version 1 up).

Version 2 adds a rank per layer: a family whose layers have different ranks (FamilyFit.ranks) lists them under
`families.<f>.ranks` (per MoE layer, in layer order; `r` is their maximum, the bank stays [m, r, d]) and stores
its adapters per layer, `<f>.adapters.<layer>` [E_l, p, r_l], only the real columns. An artifact is written at the
lowest version that holds it (1 when every family has one rank), so such artifacts are byte-identical to before.

    save(result, "out/")                                   # writer
    doc = read_document(Path("out/") / CONFIG_FILE)         # reader: the JSON document, checked
    families = read_families("out/", doc)                   # reader: {family: FamilyFit}, checked

Codes are stored sparse (CSR: indptr, indices, values). A quantized bank or adapter tensor (FamilyFit.quant; format
version 2) is stored as its packed parts {family}.{part}.codes (uint8) / .scales / .zeros (fp16), with its shape,
bits and group in globe_config.json families.{family}.quant.{part}; it is read back dequantized into the FamilyFit
(fp32) beside the packed parts. A quantized residual [N, p, d] (quant part "residual") is stored the same way,
{family}.residual.codes / .scales / .zeros, and kept packed in FamilyFit.quant.
A save without quantized parts writes format version 1, as before. Banks, adapters and code values are stored in
the source checkpoint's dtype (bf16 for a bf16 model: the runtime computes with them in that dtype anyway) and read back in
fp32; the z-score scales stay fp32 (N numbers, kept exact for analysis; the runtime does not use them). Every file is written atomically (globe.core.files:
temp file in the same directory, fsync, rename), so a crash leaves either the previous or the new complete file.
globe.artifact turns this into a FitResult with its FitConfig and checks that it fits a model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from globe.core import outputs
from globe.core.files import atomic_write_all, sort_metadata
from globe.core.mixing import PHI
from globe.core.outputs import json_text
from globe.core.result import FamilyFit, FitResult
from globe.errors import ArtifactError, ShapeError
from globe.quant.tensor import QuantizedTensor

PHIS: tuple[str, ...] = tuple(PHI)      # the nonlinearities an artifact may name (those core.mixing composes with)
FORMAT_VERSION = 2                  # 2: a rank per layer, and/or quantized parts (each written only when used)
QUANT_PARTS = ("bank", "adapters", "residual")   # residual: [N, p, d] W_i - W_hat_i, always packed
BANKS_FILE = "banks.safetensors"
CONFIG_FILE = "globe_config.json"


def codes_to_csr(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense codes [N, m] -> indptr [N+1] int64, indices [nnz] int32, values [nnz] in `dtype`."""
    mask = codes != 0
    indptr = torch.zeros(codes.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = mask.sum(1).cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    return {"indptr": indptr, "indices": cols.to(torch.int32), "values": codes[rows, cols].to(dtype).contiguous()}


def csr_to_codes(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    codes = torch.zeros(n, m, dtype=torch.float32)
    codes[rows, indices.long()] = values.float()
    return codes


def layer_adapters(fam: FamilyFit) -> dict[int, torch.Tensor]:
    """layer -> the real adapters of its experts, [E_l, p, r_l] (rows in the order of fam.ids)."""
    ranks, layer_of = fam.layer_rank(), fam.ids[:, 0]
    return {layer: fam.adapters[layer_of == layer, :, :r] for layer, r in ranks.items()}


def document_version(result: FitResult) -> int:
    """The lowest format version that holds `result`: 2 when some family has a rank per layer or a quantized part,
    else 1 (readable by older globe versions)."""
    return 2 if any("ranks" in f.shape or f.quant for f in result.families.values()) else 1


def family_tensors(fam: FamilyFit, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A family's stored tensors; a quantized part (fam.quant) as {f}.{part}.codes / .scales / .zeros."""
    f = fam.family
    out = {f"{f}.scales": fam.scales.float(), f"{f}.ids": fam.ids.to(torch.int32)}
    if "bank" in fam.quant:
        out.update(fam.quant["bank"].tensors(f"{f}.bank"))
    else:
        out[f"{f}.bank"] = fam.bank.to(dtype)
    if "adapters" in fam.quant:
        out.update(fam.quant["adapters"].tensors(f"{f}.adapters"))
    elif "ranks" in fam.shape:                                # per layer [E_l, p, r_l]: no padding stored
        out.update({f"{f}.adapters.{layer}": a.to(dtype) for layer, a in layer_adapters(fam).items()})
    else:
        out[f"{f}.adapters"] = fam.adapters.to(dtype)
    if "residual" in fam.quant:
        out.update(fam.quant["residual"].tensors(f"{f}.residual"))
    out.update({f"{f}.codes.{k}": v for k, v in codes_to_csr(fam.codes.cpu(), dtype).items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def family_info(fam: FamilyFit) -> dict[str, Any]:
    info: dict[str, Any] = {"phi": fam.phi, **fam.shape}
    if fam.quant:
        info["quant"] = {part: qt.meta() for part, qt in fam.quant.items()}
    return info


def config_document(result: FitResult) -> dict[str, Any]:
    return {"format_version": document_version(result), "source": result.source, "config": result.config.to_dict(),
            "families": {n: family_info(f) for n, f in result.families.items()},
            "params": result.params, "metrics": result.metrics, "timings": result.timings,
            "history": {n: f.history for n, f in result.families.items()}}


def storage_dtype(result: FitResult) -> torch.dtype:
    """The dtype an artifact is stored in: the source checkpoint's floating dtype (fp32 when unknown)."""
    name = str((result.source.get("inventory") or {}).get("dtype") or "float32")
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) else torch.float32


def artifact_id(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> str:
    """Id shared by banks.safetensors and globe_config.json: a hash of the tensors and of the deterministic part
    of the document (format, source, config, shapes), not of timings or memory, so the same fit gives the same
    bytes on every run while two different fits never share an id."""
    digest = hashlib.sha256(json_text({k: doc[k] for k in ("format_version", "source", "config", "families")},
                                      sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save(result: FitResult, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the artifact directory (banks.safetensors + globe_config.json); returns its path. Both files are
    replaced together (see atomic_write_all): a failure leaves the previous artifact whole.

    dtype: storage dtype of banks, adapters and code values (default: the source checkpoint's, storage_dtype)."""
    dtype = dtype or storage_dtype(result)
    out = outputs.writable_dir(out)
    tensors: dict[str, torch.Tensor] = {}
    for fam in result.families.values():
        tensors.update(family_tensors(fam, dtype))
    doc = config_document(result)
    # Both files carry the same id, so a crash between the two renames, which leaves a new banks file beside an
    # old config, is detected by read_families() instead of mixing two fits.
    doc["artifact_id"] = artifact_id(tensors, doc)
    meta = {"format_version": str(doc["format_version"]), "families": ",".join(result.families),
            "artifact_id": doc["artifact_id"], **{f"phi.{n}": f.phi for n, f in result.families.items()}}
    text = json_text(doc, indent=1)

    def write_banks(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        sort_metadata(tmp)                              # the same fit gives the same bytes
    atomic_write_all({out / BANKS_FILE: write_banks,
                      out / CONFIG_FILE: lambda tmp: tmp.write_text(text)})
    return out


def read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} not found: not a GloBE artifact directory (run `globe fit` first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not UTF-8 text (byte offset {exc.start}): re-run `globe fit`") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} must hold a JSON object, not {type(doc).__name__}: re-run `globe fit`")
    version = doc.get("format_version", -1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path}: format_version must be an integer (got {version!r})")
    if version > FORMAT_VERSION or version < 1:
        raise ArtifactError(f"{path} has format_version {version}; this globe reads versions 1..{FORMAT_VERSION}"
                            + (": upgrade globe" if version > FORMAT_VERSION else ""))
    _check_document(path, doc)
    return doc


def _check_document(path: Path, doc: dict[str, Any]) -> None:
    """ArtifactError naming the key of globe_config.json whose type or value cannot be right."""
    def fail(key: str, want: str, value: Any) -> None:
        raise ArtifactError(f"{path}: {key} must be {want} (got {value!r}); re-run `globe fit` or restore the file")
    families = doc.get("families")
    if not isinstance(families, dict) or not families:
        fail("families", "an object of fitted families", families)
    for name, info in families.items():
        if name not in ("gate", "up", "down"):
            fail("families", "keyed by gate / up / down", name)
        if not isinstance(info, dict):
            fail(f"families.{name}", "an object", info)
        baseless = isinstance(info.get("quant"), dict) and "residual" in info["quant"]   # r = 0: no base (plain)
        for key in ("N", "p", "d", "m", "r"):
            value = info.get(key)
            low = 0 if key == "r" and baseless else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(f"families.{name}.{key}", "a positive integer" if low else "an integer >= 0", value)
        ranks = info.get("ranks")
        if ranks is not None and (not isinstance(ranks, list) or not ranks or not all(
                isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= info["r"] for r in ranks)):
            fail(f"families.{name}.ranks", f"a list of ranks in 1..{info['r']} per layer", ranks)
        if info.get("phi") not in PHIS:
            fail(f"families.{name}.phi", f"one of {', '.join(PHIS)}", info.get("phi"))
    for key in ("source", "metrics", "history", "timings"):
        if key in doc and not isinstance(doc[key], dict):
            fail(key, "an object", doc[key])
    for key in ("metrics", "history"):
        for name, value in doc.get(key, {}).items():
            if not isinstance(value, dict):
                fail(f"{key}.{name}", "an object", value)
    for name, phases in doc.get("history", {}).items():
        for phase, records in phases.items():
            if not isinstance(records, list) or not all(isinstance(r, (dict, int, float)) for r in records):
                fail(f"history.{name}.{phase}", "a list of records", records)
    model_dir = doc.get("source", {}).get("model_dir")
    if model_dir is not None and not isinstance(model_dir, str):
        fail("source.model_dir", "a path string", model_dir)
    if not isinstance(doc.get("config"), dict):
        fail("config", "the fit config object", doc.get("config"))


def check_pair(out: Path, doc: dict[str, Any]) -> None:
    """ArtifactError if banks.safetensors and globe_config.json were written by different saves (artifacts
    written before ids existed have none and pass)."""
    with safe_open(str(out / BANKS_FILE), "pt") as fh:
        banks_id = (fh.metadata() or {}).get("artifact_id")
    if banks_id is not None and doc.get("artifact_id") is not None and banks_id != doc["artifact_id"]:
        raise ArtifactError(f"{out / BANKS_FILE} and {out / CONFIG_FILE} come from different fits (a write was "
                            "interrupted?): re-run `globe fit --resume` (or `--overwrite`) into this directory")


def read_banks(out: str | Path, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of banks.safetensors, checked to come from the same save as `doc` (read_document)."""
    out = Path(out)
    try:
        tensors = load_file(str(out / BANKS_FILE))
        check_pair(out, doc)
    except FileNotFoundError:
        raise ArtifactError(f"{out / BANKS_FILE} not found: the artifact is incomplete") from None
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{out / BANKS_FILE} is corrupt or truncated ({exc}): re-run `globe fit`") from None
    return tensors


def read_families(out: str | Path, doc: dict[str, Any],
                  tensors: dict[str, torch.Tensor] | None = None) -> dict[str, FamilyFit]:
    """Every family of an artifact directory whose globe_config.json `doc` (read_document) is already read,
    validating shapes, dtypes, index ranges and finiteness (ArtifactError naming the file and tensor)."""
    out = Path(out)
    tensors = read_banks(out, doc) if tensors is None else tensors
    return {name: _family_from_tensors(name, info, tensors, doc.get("metrics", {}).get(name, {}), out,
                                       doc.get("history", {}).get(name))
            for name, info in doc["families"].items()}


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
_DTYPES = {"bank": FLOAT_DTYPES, "adapters": FLOAT_DTYPES, "scales": FLOAT_DTYPES, "codes.values": FLOAT_DTYPES,
           "ids": INDEX_DTYPES, "codes.indptr": INDEX_DTYPES, "codes.indices": INDEX_DTYPES}


def check_family_tensors(name: str, t: dict[str, torch.Tensor], m: int, where: Path) -> None:
    """ArtifactError naming `where` and the tensor when one of a family's stored tensors has a wrong dtype,
    non-finite values or indices out of range (codes in [0, m), CSR row pointers from 0 up to nnz, ids >= 0)."""
    def fail(key: str, what: str) -> None:
        raise ArtifactError(f"{where}: tensor {name}.{key} {what}; the artifact is damaged, re-run `globe fit`")
    for key, dtypes in _DTYPES.items():
        if t[key].dtype not in dtypes:
            fail(key, f"is {str(t[key].dtype).removeprefix('torch.')}, expected one of "
                      f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    for key in ("bank", "adapters", "scales", "codes.values"):
        finite = torch.isfinite(t[key])
        if not bool(finite.all()):
            fail(key, f"holds {int((~finite).sum())} NaN/Inf value(s)")
    indices, indptr = t["codes.indices"], t["codes.indptr"]
    if indices.dim() != 1 or t["codes.values"].shape != indices.shape:
        fail("codes.indices", f"has shape {list(indices.shape)} but codes.values {list(t['codes.values'].shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m):
        fail("codes.indices", f"holds atom indices in [{int(indices.min())}, {int(indices.max())}], outside [0, {m})")
    if int(indptr[0]) != 0 or bool((indptr[1:] < indptr[:-1]).any()) or int(indptr[-1]) != indices.numel():
        fail("codes.indptr", f"is not a row pointer from 0 up to the {indices.numel()} stored codes")
    if bool((t["ids"] < 0).any()):
        fail("ids", "holds negative (layer, expert) ids")


def quantized_parts(name: str, info: dict, tensors: dict, where: Path) -> dict[str, QuantizedTensor]:
    """The quantized parts of family `name` ({part: QuantizedTensor}) that its `info` (globe_config.json
    families.NAME) lists, checked against their metadata (ArtifactError naming the tensor)."""
    quant = info.get("quant") or {}
    if not isinstance(quant, dict) or not set(quant) <= set(QUANT_PARTS):
        raise ArtifactError(f"{where}: families.{name}.quant must map {' / '.join(QUANT_PARTS)} to their "
                            f"quantization metadata (got {quant!r})")
    parts = {}
    for part, meta in quant.items():
        prefix = f"{name}.{part}"
        missing = [f"{prefix}.{k}" for k in ("codes", "scales", "zeros") if f"{prefix}.{k}" not in tensors]
        if missing:
            raise ArtifactError(f"{where} lacks tensor(s) {', '.join(missing)}")
        try:
            parts[part] = QuantizedTensor.from_tensors(tensors, prefix, meta)
        except (ShapeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: quantized tensor {prefix} does not fit its metadata ({exc})") from None
    return parts


def _family_from_tensors(name: str, info: dict, tensors: dict, metrics: dict, out: Path,
                         history: dict | None = None) -> FamilyFit:
    quant = quantized_parts(name, info, tensors, out / BANKS_FILE)
    if "ranks" in info and "adapters" in quant:
        raise ArtifactError(f"{out / CONFIG_FILE}: family {name} has both ranks per layer and quantized adapters, "
                            f"which this globe does not write: re-fit the artifact")
    keys = ["bank", "adapters", "scales", "ids", "codes.indptr", "codes.indices", "codes.values"]
    keys = [k for k in keys if not (k == "adapters" and "ranks" in info)]
    missing = [f"{name}.{k}" for k in keys if k not in quant and f"{name}.{k}" not in tensors]
    if missing:
        raise ArtifactError(f"{out / BANKS_FILE} lacks tensor(s) {', '.join(missing)}")
    t = {k: quant[k].dequantize() if k in quant else tensors[f"{name}.{k}"] for k in keys}
    n, p, d, m, r = info["N"], info["p"], info["d"], info["m"], info["r"]
    if "ranks" in info:
        if tuple(t["ids"].shape) != (n, 2):
            raise ArtifactError(f"{out / BANKS_FILE}: tensor {name}.ids has shape {tuple(t['ids'].shape)}, "
                                f"expected {(n, 2)} from {CONFIG_FILE}")
        t["adapters"] = _padded_adapters(name, info, tensors, t["ids"], out)
    expect = {"bank": (m, r, d), "adapters": (n, p, r), "scales": (n,), "ids": (n, 2), "codes.indptr": (n + 1,)}
    for k, shape in expect.items():
        if tuple(t[k].shape) != shape:
            raise ArtifactError(f"{out / BANKS_FILE}: tensor {name}.{k} has shape {tuple(t[k].shape)}, "
                                f"expected {shape} from {CONFIG_FILE}")
    check_family_tensors(name, t, m, out / BANKS_FILE)
    if "residual" in quant and quant["residual"].shape != (n, p, d):
        raise ArtifactError(f"{out / BANKS_FILE}: quantized tensor {name}.residual has shape "
                            f"{quant['residual'].shape}, expected {(n, p, d)} from {CONFIG_FILE}")
    fam = build_family(name, t, info["phi"], metrics, history, info.get("ranks"))
    fam.quant = quant
    return fam


def _padded_adapters(name: str, info: dict, tensors: dict, ids: torch.Tensor, out: Path) -> torch.Tensor:
    """[N, p, r_max] from the per-layer adapters [E_l, p, r_l] of a version-2 family (zeros past r_l)."""
    layers = sorted({int(l) for l in ids[:, 0].tolist()})
    if len(layers) != len(info["ranks"]):
        raise ArtifactError(f"{out / CONFIG_FILE}: families.{name}.ranks lists {len(info['ranks'])} layers but "
                            f"{name}.ids holds {len(layers)}")
    first = tensors.get(f"{name}.adapters.{layers[0]}")
    padded = torch.zeros(info["N"], info["p"], info["r"], dtype=first.dtype if first is not None else torch.float32)
    for layer, r in zip(layers, info["ranks"]):
        key, rows = f"{name}.adapters.{layer}", ids[:, 0] == layer
        if key not in tensors:
            raise ArtifactError(f"{out / BANKS_FILE} lacks tensor {key}")
        if tuple(tensors[key].shape) != (int(rows.sum()), info["p"], r):
            raise ArtifactError(f"{out / BANKS_FILE}: tensor {key} has shape {tuple(tensors[key].shape)}, expected "
                                f"{(int(rows.sum()), info['p'], r)} from {CONFIG_FILE}")
        padded[rows, :, :r] = tensors[key].to(padded.dtype)
    return padded


def build_family(name: str, t: dict[str, torch.Tensor], phi: str, metrics: dict,
                 history: dict | None = None, ranks: list[int] | None = None) -> FamilyFit:
    """FamilyFit from its stored tensors (keys without the family prefix, codes in CSR form); floating tensors come
    back in fp32 (exactly the stored values, whatever the storage dtype)."""
    codes = csr_to_codes(t["codes.indptr"], t["codes.indices"], t["codes.values"], t["bank"].shape[0])
    return FamilyFit(family=name, bank=t["bank"].float(), codes=codes, adapters=t["adapters"].float(),
                     scales=t["scales"].float(),
                     ids=t["ids"].long(), phi=phi, metrics=metrics, history=history or {},
                     ranks=tuple(ranks) if ranks else None)
