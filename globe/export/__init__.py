"""Export of GloBE-compressed models.

    save_compressed(model_dir, "out/", "compressed/")   # AutoModelForCausalLM.from_pretrained("compressed/") after
                                                         # `import globe` (quant_method "globe"), or load_compressed
    export_dense(model_dir, "out/", "dense_hf/")         # reconstructed weights, stock transformers checkpoint

Names are imported on first use (PEP 562), so that `import globe` (which installs globe.export.hf_hook) stays
light.
"""
from __future__ import annotations

import importlib

from globe.export.hf_hook import install as _install_hf_quantizer

_WHERE = {"load_artifact": "compressed", "load_compressed": "compressed", "runtime_state_dict": "compressed",
          "save_compressed": "compressed", "dense_state_dict": "dense", "export_dense": "dense", "load_model": "files",
          "GlobeConfig": "hf_quantizer", "GlobeHfQuantizer": "hf_quantizer"}
_FORMATS = ("MARKER_FILE", "WEIGHTS_FILE", "is_compressed")

_install_hf_quantizer()                     # quant_method "globe" for from_pretrained, without importing transformers


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"globe.export.{_WHERE[name]}"), name)
    elif name in _FORMATS:
        value = getattr(importlib.import_module("globe.formats.checkpoint"), name)
    else:
        raise AttributeError(f"module 'globe.export' has no attribute {name!r}")
    if name not in ("GlobeConfig", "GlobeHfQuantizer"):
        globals()[name] = value
    return value


__all__ = ["MARKER_FILE", "WEIGHTS_FILE", "is_compressed", "load_artifact", "load_compressed", "runtime_state_dict",
           "save_compressed", "dense_state_dict", "export_dense", "load_model", "GlobeConfig", "GlobeHfQuantizer"]
