"""The compressed checkpoint as an untrusted input: one validator, run before any of its tensors is used.

    config = validate_checkpoint(path)            # ArtifactError / ConfigError / CheckpointError, one line each
    config = validate_checkpoint(path, force=True)   # a content-hash mismatch only warns

Checked, from JSON and safetensors headers only (plus the small code-index tensors, for their range):
    config.json          readable, no `auto_map` (custom code is never run), the values GloBE reads typed and
                         bounded (globe.io.arch.validate_config)
    quantization_config  every value typed and bounded: format_version, mode, families (m, r, k, phi, ranks,
                         quant: bits / group / method of each packed part), cache_bytes, max_gathered_pairs, dtypes
    *.safetensors        each file's header and size (a truncated or oversized file is named), every expected
                         GloBE tensor present with its shape and dtype (globe.formats.checkpoint.family_shapes; a
                         packed part's codes U8 / scales F16 / zeros F16, packed_shapes), no
                         unknown GloBE tensor or layer beyond the config's layer count, untouched projections of
                         every expert, code indices in [0, m)
    globe_config.json    the content hash of the checkpoint's own tensors (`checkpoint_hash`, see tensors_hash)
                         when recorded, by verify_content once the load's finer checks (missing keys, NaN/Inf) have
                         run and before any tensor is used; older checkpoints without it load with an INFO line

Errors name the file, the tensor or key, what was expected and what was found.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from globe.core.mixing import PHI
from globe.errors import ArtifactError, CheckpointError, ConfigError, RemoteCodeError

log = logging.getLogger(__name__)

HASH_KEY = "checkpoint_hash"            # globe_config.json: {"algorithm": "sha256", "tensors": hex}
_FLOAT = ("F16", "BF16", "F32", "F64")
_INT = ("I32", "I64")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
MAX_HEADER = 100 * 1024 * 1024          # safetensors' own limit on a header's size
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- custom code ----
def refuse_remote_code(path: str | Path, config: dict[str, Any] | None = None) -> None:
    """RemoteCodeError when a checkpoint's config.json (or tokenizer_config.json) asks for custom code
    (`auto_map`): globe never runs code shipped with a checkpoint, and never asks."""
    path = Path(path)
    for name in ("config.json", "tokenizer_config.json"):
        doc = config if name == "config.json" and config is not None else _json_or_none(path / name)
        if isinstance(doc, dict) and doc.get("auto_map"):
            raise RemoteCodeError(f"{path / name} asks for custom code (auto_map {doc['auto_map']!r}); globe never "
                                  f"runs code shipped with a checkpoint: use a checkpoint of a supported built-in "
                                  f"architecture, or remove auto_map if the model does not need it")


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- safetensors headers ----
def read_header(file: Path) -> dict[str, dict[str, Any]]:
    """{tensor: {"dtype", "shape", "data_offsets"}} of one safetensors file, its size checked against the header:
    CheckpointError naming the file when it is truncated, oversized or its header is not valid."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated ({size} bytes, no safetensors header); re-export it")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise CheckpointError(f"{file} is truncated or not a safetensors file (header of {length} bytes, "
                                      f"file of {size}); re-export it")
            header = json.loads(fh.read(length).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {file} ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: its safetensors header is not valid JSON; re-export it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: its safetensors header is not an object; re-export it")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and isinstance(info.get("shape"), list)
              and all(_is_int(s) and s >= 0 for s in info["shape"]) and isinstance(info.get("data_offsets"), list)
              and len(info["data_offsets"]) == 2 and all(_is_int(o) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{file}: tensor {name} has an invalid header entry {info!r}; re-export it")
        lo, hi = info["data_offsets"]
        numel = 1
        for s in info["shape"]:
            numel *= s
        if hi - lo != numel * _DTYPE_BYTES[info["dtype"]]:
            raise CheckpointError(f"{file}: tensor {name} spans {hi - lo} bytes, its shape {info['shape']} and "
                                  f"dtype {info['dtype']} need {numel * _DTYPE_BYTES[info['dtype']]}; re-export it")
        end = max(end, hi)
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "oversized (bytes after the last tensor)"
        raise CheckpointError(f"{file} is {state}: {size} bytes, its header needs {8 + length + end}; re-export it")
    return header


def read_headers(path: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{tensor: (file, header entry)} over every *.safetensors file of `path`; a tensor in two files is refused."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"no *.safetensors file in {path}: the checkpoint is incomplete; re-export it")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in out:
                raise CheckpointError(f"tensor {name} appears in both {out[name][0]} and {file}; re-export it")
            out[name] = (file, info)
    return out


# ---- the content hash of the checkpoint's own tensors ----
def tensors_hash(path: str | Path) -> str:
    """sha256 over every tensor of the checkpoint's *.safetensors files (name, dtype, shape and bytes, in name
    order): independent of the files' header metadata and of how the tensors are split into shards."""
    path = Path(path)
    headers = read_headers(path)
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(headers):
            file, info = headers[name]
            if file not in handles:
                handles[file] = file.open("rb")
                (length,) = struct.unpack("<Q", handles[file].read(8))
                handles[file].base = 8 + length        # type: ignore[attr-defined]
            fh = handles[file]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            lo, hi = info["data_offsets"]
            fh.seek(fh.base + lo)
            left = hi - lo
            while left:
                chunk = fh.read(min(left, 1 << 24))
                if not chunk:
                    raise CheckpointError(f"{file} is truncated in tensor {name}; re-export it")
                digest.update(chunk)
                left -= len(chunk)
    finally:
        for fh in handles.values():
            fh.close()
    return digest.hexdigest()


def check_hash(path: Path, force: bool = False) -> None:
    """Compare the checkpoint's tensors with the hash its globe_config.json records: ArtifactError on a mismatch
    (a warning with force); an INFO line for a checkpoint written before hashes were recorded."""
    doc = _json_or_none(path / "globe_config.json")
    recorded = doc.get(HASH_KEY) if isinstance(doc, dict) else None
    if recorded is None:
        log.info("%s records no content hash of its tensors (written by an older globe): not verified", path)
        return
    if not isinstance(recorded, dict) or recorded.get("algorithm") != "sha256" or \
            not isinstance(recorded.get("tensors"), str):
        raise ArtifactError(f"{path / 'globe_config.json'}: {HASH_KEY} must be {{\"algorithm\": \"sha256\", "
                            f"\"tensors\": HEX}} (got {recorded!r}); re-export the checkpoint")
    found = tensors_hash(path)
    if found == recorded["tensors"]:
        return
    what = (f"{path}: the tensors of its *.safetensors files do not match the content hash recorded in "
            f"globe_config.json ({HASH_KEY} {recorded['tensors'][:16]}..., found {found[:16]}...)")
    if not force:
        raise ArtifactError(f"{what}: the checkpoint was modified or damaged; re-export it, or pass --force to use "
                            f"it anyway")
    log.warning("%s: using it anyway (--force)", what)


# ---- quantization_config ----
def check_quant_values(quant: Any, where: Path, experts: int, p: int, d: int, moe_layers: int) -> None:
    """ConfigError naming `where` (config.json) and the key of quantization_config whose type or value is wrong."""
    from globe.formats.checkpoint import FORMAT_VERSION, MIN_VERSION, MODES, QUANT_METHOD, quant_problem
    from globe.io.arch import FAMILIES

    def bad(key: str, want: str, value: Any) -> ArtifactError:
        return ArtifactError(f"{where}: quantization_config.{key} must be {want} (got {value!r}); re-export the "
                           f"checkpoint")
    if not isinstance(quant, dict):
        raise bad("", "an object", quant)
    if quant.get("quant_method") != QUANT_METHOD:
        raise bad("quant_method", f"{QUANT_METHOD!r}", quant.get("quant_method"))
    version = quant.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: quantization_config has format_version {version}; this globe reads "
                            f"{MIN_VERSION}..{FORMAT_VERSION}: upgrade globe")
    if not _is_int(version) or not MIN_VERSION <= version <= FORMAT_VERSION:
        raise bad("format_version", f"an integer in {MIN_VERSION}..{FORMAT_VERSION} (a newer one needs a newer "
                                    f"globe)", version)
    if quant.get("mode") not in MODES:
        raise bad("mode", f"one of {', '.join(MODES)}", quant.get("mode"))
    cache = quant.get("cache_bytes")
    if cache is not None and (not _is_int(cache) or cache < 0):
        raise bad("cache_bytes", "null or an integer >= 0", cache)
    pairs = quant.get("max_gathered_pairs", 16)
    if not _is_int(pairs) or not 1 <= pairs <= 1 << 20:
        raise bad("max_gathered_pairs", "an integer in 1..1048576", pairs)
    for key in ("factor_dtype", "model_dtype"):
        if quant.get(key) is not None and quant[key] not in _FLOAT_NAMES:
            raise bad(key, f"null or one of {', '.join(_FLOAT_NAMES)}", quant[key])
    families = quant.get("families")
    if not isinstance(families, dict) or not families or not set(families) <= set(FAMILIES):
        raise bad("families", f"a non-empty object keyed by {' / '.join(FAMILIES)}", families)
    for name, info in families.items():
        if not isinstance(info, dict):
            raise bad(f"families.{name}", "an object with m, r, k, phi", info)
        out_dim, in_dim = (d, p) if name == "down" else (p, d)
        r_max = min(out_dim, in_dim)
        baseless = isinstance(info.get("quant"), dict) and "residual" in info["quant"]   # r = 0: no base (plain)
        r_lo = 0 if baseless else 1
        bounds = {"r": (r_lo, r_max, f"min(p, d) = {r_max}"),
                  "m": (1, experts * moe_layers * r_max, f"experts x MoE layers x r = {experts * moe_layers * r_max}")}
        for key in ("r", "m"):
            lo, hi, why = bounds[key]
            value = info.get(key)
            if not _is_int(value) or not lo <= value <= hi:
                raise bad(f"families.{name}.{key}", f"an integer in {lo}..{hi} ({why})", value)
        k, k_lo = info.get("k"), 0 if info["r"] == 0 else 1           # no base: no code (k = 0)
        if not _is_int(k) or not k_lo <= k <= info["m"]:
            raise bad(f"families.{name}.k", f"an integer in {k_lo}..m = {info['m']}", k)
        ranks = info.get("ranks")
        if ranks is not None and (not isinstance(ranks, dict) or not all(
                isinstance(l, str) and l.isdigit() and _is_int(v) and 1 <= v <= info["r"] for l, v in ranks.items())):
            raise bad(f"families.{name}.ranks", f"an object mapping MoE layers to ranks in 1..r = {info['r']}", ranks)
        phi = info.get("phi", "identity")
        if phi not in PHI:
            raise bad(f"families.{name}.phi", f"one of {', '.join(PHI)}", phi)
        problem = quant_problem(info.get("quant"))
        if problem:
            raise ArtifactError(f"{where}: quantization_config.families.{name}.quant{problem}; re-export the "
                                f"checkpoint")
        if info.get("quant") and version < 3:
            raise bad("format_version", f"3 for the packed parts of families.{name}.quant", version)


# ---- the whole checkpoint ----
_VALID: dict[tuple, dict[str, Any]] = {}     # checkpoints validated in this process, by their files' stat


def _stamp(path: Path, force: bool) -> tuple:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return (str(path.resolve()), force, *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


_DEFERRED: ContextVar[frozenset[str]] = ContextVar("globe_deferred_checkpoints", default=frozenset())


@contextmanager
def deferred(path: str | Path) -> Iterator[None]:
    """Within the block, verify_content(path) is a no-op: the caller (load_compressed, which passes its own
    --force) verifies after its finer checks of the loaded model."""
    token = _DEFERRED.set(_DEFERRED.get() | {str(Path(path).resolve())})
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def verify_content(path: str | Path, force: bool = False, caller: bool = True) -> None:
    """check_hash after loading, before any tensor is used (a damaged tensor is named by the finer checks of the
    load first: missing keys, NaN/Inf); force turns a mismatch into a warning. caller=False (the quantizer) skips
    a checkpoint inside a deferred() block."""
    path = Path(path)
    if not caller and str(path.resolve()) in _DEFERRED.get():
        return
    check_hash(path, force)


def validate_checkpoint(path: str | Path, force: bool = False) -> dict[str, Any]:
    """validate_checkpoint_files, once per unchanged directory in a process (load_compressed validates and then
    calls from_pretrained, whose quantizer validates again). The content hash is checked by verify_content."""
    from globe.core.outputs import recover_swap
    path = Path(path)
    recover_swap(path)                         # an export killed between its renames: its old version back
    stamp = _stamp(path, force)
    if stamp not in _VALID:
        _VALID.clear()
        _VALID[stamp] = validate_checkpoint_files(path, force)
    return _VALID[stamp]


def validate_checkpoint_files(path: str | Path, force: bool = False) -> dict[str, Any]:
    """Check a compressed checkpoint (format 2) before any tensor of it is used; returns its config.json.
    Errors: RemoteCodeError (auto_map), ConfigError (config.json values), CheckpointError (files, headers),
    ArtifactError (tensors against the config, content hash), all naming the file and key or tensor."""
    from globe.formats.checkpoint import family_shapes, packed_key, packed_shapes, state_key, stored_prefix
    from globe.io.arch import FAMILIES, config_value, get_arch, validate_config
    from globe.io.shards import read_config
    path = Path(path)
    config = read_config(path)
    where = path / "config.json"
    refuse_remote_code(path, config)
    spec = get_arch(config)
    validate_config(config, spec, where)
    experts = int(config_value(config, spec.num_experts_keys, spec.model_type))
    p = int(config_value(config, spec.expert_size_keys, spec.model_type))
    d = int(config_value(config, spec.hidden_size_keys, spec.model_type))
    layers = spec.moe_layers(config)
    if not layers:
        raise ConfigError(f"{where}: the config names no MoE layer ({spec.num_layers_keys[0]} "
                          f"{spec.num_layers(config)}); a compressed checkpoint has routed experts to load")
    quant = config.get("quantization_config")
    check_quant_values(quant, where, experts, p, d, len(layers))
    families = quant["families"]
    headers = read_headers(path)
    num_layers = spec.num_layers(config)

    present = {spec.layer_of(name) for name in headers}
    absent = [layer for layer in range(num_layers) if layer not in present]
    if absent:
        raise ArtifactError(f"{path}: no tensor of layer {absent[0]}, but config.json has "
                            f"{spec.num_layers_keys[0]} = {num_layers}; re-export the checkpoint")
    beyond = sorted({layer for name in headers if (layer := spec.layer_of(name)) is not None and layer >= num_layers})
    if beyond:
        raise ArtifactError(f"{path}: the tensors hold layer {beyond[0]}, but config.json has "
                            f"{spec.num_layers_keys[0]} = {num_layers}; re-export the checkpoint")

    def tensor(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if name not in headers:
            raise ArtifactError(f"{path}: tensor {name} is missing (expected shape {list(shape)} from "
                                f"quantization_config and config.json); re-export the checkpoint")
        file, info = headers[name]
        if tuple(info["shape"]) != tuple(shape) or info["dtype"] not in dtypes:
            raise ArtifactError(f"{file}: tensor {name} has shape {info['shape']} {info['dtype']}, expected "
                                f"{list(shape)} {'/'.join(dtypes)} (quantization_config and config.json: "
                                f"{experts} experts, m/r/k/quant of its family); re-export the checkpoint")

    expected: set[str] = set()
    first = min(layers)
    prefixes = []
    for layer in layers:
        prefix = stored_prefix(spec, layer, headers, next(iter(families)))
        prefixes.append(prefix + ".")
        for family, info in families.items():
            shapes = family_shapes(family, info, experts, p, d, layer)
            packed = info.get("quant") or {}
            for kind in ("adapters", "code_values", "code_indices", "bank", "residual"):
                if kind == "residual" and kind not in packed:      # residuals are optional, and always packed
                    continue
                key = state_key(kind, family, prefix)
                if kind in packed:                 # codes / scales / zeros; a packed bank in the first layer only
                    if kind == "bank" and layer != first:
                        continue
                    for buffer, (shape, dtype) in packed_shapes(shapes[kind], packed[kind]).items():
                        tensor(packed_key(kind, family, buffer, prefix), shape, (dtype,))
                        expected.add(packed_key(kind, family, buffer, prefix))
                    continue
                if kind == "bank" and layer != first:
                    if key in headers:             # tied to the first layer's; tolerated when stored
                        tensor(key, shapes[kind], _FLOAT)
                        expected.add(key)
                    continue
                tensor(key, shapes[kind], _INT if kind == "code_indices" else _FLOAT)
                expected.add(key)
        for family in FAMILIES:
            if family in families:
                continue
            out_dim, in_dim = (d, p) if family == "down" else (p, d)
            fused = f"{prefix}.{family}_proj"
            if fused in headers:
                tensor(fused, (experts, out_dim, in_dim), _FLOAT)
                expected.add(fused)
                continue
            for e in range(experts):
                key = spec.expert_key(family, layer, e) if prefix != spec.experts_path(layer) else \
                    f"{prefix}.{e}.{family}_proj.weight"
                key = key if key in headers else f"{prefix}.{e}.{family}_proj.weight"
                tensor(key, (out_dim, in_dim), _FLOAT)
                expected.add(key)
    prefixes = tuple(prefixes)
    for name in sorted(headers):
        if name in expected:
            continue
        layer = spec.layer_of(name)
        if name.startswith(prefixes):
            raise ArtifactError(f"{headers[name][0]}: unknown tensor {name} in a GloBE experts module (expected "
                                f"only the tensors of families {', '.join(families)} and untouched projections); "
                                f"re-export the checkpoint")
        if layer is not None and layer >= num_layers:
            raise ArtifactError(f"{headers[name][0]}: tensor {name} belongs to layer {layer}, but config.json has "
                                f"{spec.num_layers_keys[0]} = {num_layers}; re-export the checkpoint")
        if re.search(r"\.(bank|adapters|code_values|code_indices|residual)\.(gate|up|down)(\.(codes|scales|zeros))?$",
                     name):
            raise ArtifactError(f"{headers[name][0]}: unknown GloBE tensor {name} (not in a MoE layer of "
                                f"config.json); re-export the checkpoint")
    _check_indices(path, headers, spec, layers, families)
    return config


def _check_indices(path: Path, headers: dict, spec: Any, layers: list[int], families: dict) -> None:
    """Every code index of every layer in [0, m) (the small [E, k] index tensors are read)."""
    from safetensors import safe_open
    from globe.formats.checkpoint import state_key, stored_prefix
    handles: dict[Path, Any] = {}
    for layer in layers:
        for family, info in families.items():
            key = state_key("code_indices", family, stored_prefix(spec, layer, headers, family))
            file = headers[key][0]
            if file not in handles:
                handles[file] = safe_open(str(file), "pt")
            index = handles[file].get_tensor(key)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= info["m"]):
                bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
                raise ArtifactError(f"{file}: tensor {key} holds code index {bad}, expected indices in "
                                    f"[0, {info['m']}) (m of family {family}); re-export the checkpoint")
