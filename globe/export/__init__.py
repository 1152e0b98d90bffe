"""Export of GloBE-compressed models.

    save_compressed(model_dir, "out/", "compressed/")   # AutoModelForCausalLM.from_pretrained("compressed/") after
                                                         # `import globe` (quant_method "globe"), or load_compressed
    export_dense(model_dir, "out/", "dense_hf/")         # reconstructed weights, stock transformers checkpoint
"""
from __future__ import annotations

from globe.export.compressed import (MARKER_FILE, WEIGHTS_FILE, is_compressed, load_artifact, load_compressed,
                                     runtime_state_dict, save_compressed)
from globe.export.dense import dense_state_dict, export_dense
from globe.export.files import load_model
from globe.export.hf_quantizer import GlobeConfig, GlobeHfQuantizer

__all__ = ["MARKER_FILE", "WEIGHTS_FILE", "is_compressed", "load_artifact", "load_compressed", "runtime_state_dict",
           "save_compressed", "dense_state_dict", "export_dense", "load_model", "GlobeConfig", "GlobeHfQuantizer"]
