"""Artifacts as the library sees them: `save` / `load` of a FitResult, and the checks that an artifact fits a model.

The on-disk format itself (banks.safetensors + globe_config.json, its version, reader and writer) is
globe.formats.artifact; here the document's fit config becomes a FitConfig again. `check_compatible` is the one
check that an artifact fits a model (a checkpoint directory or a loaded model).
"""
from __future__ import annotations

import logging
from pathlib import Path

from globe.core.result import FitResult
from globe.errors import ArtifactError, ConfigError
from globe.fit.config import FitConfig
from globe.formats.artifact import CONFIG_FILE, read_banks, read_document, read_families, save
from globe.io.arch import FAMILIES
from globe.io.model import ModelShape, checkpoint_shape
from globe.io.reader import open_checkpoint

log = logging.getLogger(__name__)

__all__ = ["save", "load", "fit_config", "check_same_weights", "check_compatible"]


def fit_config(doc: dict, where: Path) -> FitConfig:
    """The FitConfig of a checked globe_config.json document (ArtifactError naming `where` for a bad one)."""
    try:
        return FitConfig.from_dict(doc["config"])
    except ConfigError as exc:
        raise ArtifactError(f"{where}: config: {exc}") from None


def load(out: str | Path) -> FitResult:
    """Read an artifact directory back into a FitResult, validating versions, types, shapes, dtypes, index
    ranges and finiteness (ArtifactError naming the file and key)."""
    out = Path(out)
    doc = read_document(out / CONFIG_FILE)
    tensors = read_banks(out, doc)
    config = fit_config(doc, out / CONFIG_FILE)
    return FitResult(families=read_families(out, doc, tensors), config=config, source=doc.get("source", {}),
                     timings=doc.get("timings", {}))
def check_same_weights(result: FitResult, model_dir: str | Path, force: bool = False) -> None:
    """ArtifactError unless model_dir holds the weights the artifact was fitted on (the content hash of its
    routed experts recorded at fit time, see globe.io.identity; artifacts without one pass). With force=True
    other weights of the same shapes only log a warning. Call it after check_compatible."""
    fitted = result.source.get("content_hash")
    if fitted is None:
        return
    with open_checkpoint(model_dir) as reader:
        found = reader.content_hash()
    if fitted == found:
        return
    what = (f"artifact fitted on {result.source.get('model_dir', '?')} was fitted on other weights than those in "
            f"{model_dir} (same shapes, content hash {fitted} != {found})")
    if not force:
        raise ArtifactError(f"{what}: fit it on this model, or pass --force to apply it anyway")
    log.warning("%s: applying it anyway (--force)", what)


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


