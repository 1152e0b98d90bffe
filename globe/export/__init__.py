"""Export of GloBE-compressed models.

    save_compressed(model_dir, "out/", "compressed/")   # AutoModelForCausalLM.from_pretrained("compressed/") after
                                                         # `import globe` (quant_method "globe"), or load_compressed
    export_dense(model_dir, "out/", "dense_hf/")         # reconstructed weights, stock transformers checkpoint
"""
from __future__ import annotations

from globe.export.compressed import load_artifact, load_compressed, runtime_state_dict, save_compressed
from globe.export.dense import dense_state_dict, export_dense
from globe.export.files import load_model
from globe.export.hf_hook import install as _install_hf_quantizer
from globe.formats.checkpoint import MARKER_FILE, WEIGHTS_FILE, is_compressed

_install_hf_quantizer()                     # quant_method "globe" for from_pretrained, without importing transformers


def __getattr__(name: str):
    if name in ("GlobeConfig", "GlobeHfQuantizer"):             # these import transformers: on first use only
        from globe.export import hf_quantizer
        return getattr(hf_quantizer, name)
    raise AttributeError(f"module 'globe.export' has no attribute {name!r}")

__all__ = ["MARKER_FILE", "WEIGHTS_FILE", "is_compressed", "load_artifact", "load_compressed", "runtime_state_dict",
           "save_compressed", "dense_state_dict", "export_dense", "load_model", "GlobeConfig", "GlobeHfQuantizer"]
