"""A loaded compressed model saves the same format it was loaded from: `save_pretrained` of a model that
`from_pretrained` / `load_compressed` loaded from a compressed checkpoint also writes the checkpoint's
globe_config.json (the fit's provenance: source, config, metrics) and the tokenizer files (from that checkpoint,
else from the source model it records), so that `globe info / eval / bench / export` read the new directory exactly
as a `globe compress` output.

    keep_provenance(model, Path("compressed/"))     # done by the "globe" quantizer after loading
    model.save_pretrained("again/")                  # config.json, model.safetensors, globe_config.json, tokenizer

The directory is written beside "again/" and swapped in whole, like every GloBE export.
"""
from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path

from torch import nn

from globe.core import outputs
from globe.core.files import atomic_write_text
from globe.export.files import copy_side_files, staged_output, swap_in
from globe.formats.artifact import CONFIG_FILE

log = logging.getLogger(__name__)


def keep_provenance(model: nn.Module, load_dir: Path) -> None:
    """Remember load_dir's globe_config.json and where tokenizer files are; save_pretrained writes them too."""
    document = (load_dir / CONFIG_FILE).read_text(encoding="utf-8") if (load_dir / CONFIG_FILE).is_file() else None
    sources = [load_dir]
    try:
        source = json.loads(document).get("source", {}).get("model_dir") if document else None
    except (json.JSONDecodeError, AttributeError):
        source = None
    if isinstance(source, str) and Path(source).is_dir():
        sources.append(Path(source))
    model._globe_provenance = (document, [str(s) for s in sources])
    model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(self: nn.Module, save_directory, *args, **kwargs):
    """transformers' save_pretrained into a staging directory beside save_directory, plus the provenance and the
    tokenizer files, then swapped in whole (globe.export.files.swap_in): a crash at any moment leaves the previous
    directory or the new one, never a mix; the user's own files in it are kept."""
    path = Path(save_directory)
    if (path.exists() and not path.is_dir()) or kwargs.get("push_to_hub"):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)    # transformers' own handling
    outputs.recover_swap(path)                             # a save killed between its two renames
    with outputs.output_lock(path, "save_pretrained"):     # one save at a time; then a killed one's debris goes
        outputs.remove_swap_debris(path)
        staging = staged_output(path)
        try:
            out = type(self).save_pretrained(self, staging, *args, **kwargs)
            _write_provenance(self, staging)
            swap_in(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out


def _write_provenance(model: nn.Module, path: Path) -> None:
    """globe_config.json (with the content hash of the tensors just saved) and the tokenizer files into `path`."""
    document, sources = getattr(model, "_globe_provenance", (None, []))
    if document is not None:
        from globe.formats.validate import HASH_KEY, tensors_hash
        doc = json.loads(document)
        if isinstance(doc, dict) and HASH_KEY in doc:      # the content hash of what was saved, not of the load
            doc[HASH_KEY] = {"algorithm": "sha256", "tensors": tensors_hash(path)}
            document = json.dumps(doc, indent=1)
        atomic_write_text(path / CONFIG_FILE, document)
    for source in sources:
        present = tuple(p.name for p in path.iterdir())
        copied = copy_side_files(Path(source), path, skip=present)
        if copied:
            log.debug("save_pretrained: copied %s from %s", ", ".join(copied), source)
