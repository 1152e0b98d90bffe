"""GloBE (Global-Basis Experts): compress the routed experts of Mixture-of-Experts LLMs.

Every routed expert's gate and up projection, across all layers, is written as
W_i ~= s_i * A_i @ phi(sum_j alpha_ij B_j) with one shared bank B per family.

    import globe
    result = globe.fit_model("path/to/checkpoint", globe.FitConfig())
    globe.save(result, "out/")

`import globe` is light: it imports neither torch nor transformers; each name below is imported on first use
(PEP 562), and the "globe" quantizer is registered with transformers when transformers is imported.
"""
from __future__ import annotations

import importlib
import importlib.util

from globe.errors import GlobeError
from globe.export.hf_hook import install as _install_hooks

__version__ = "0.1.0"

_WHERE = {"load": "globe.artifact", "save": "globe.artifact",
          "FitConfig": "globe.fit.config", "BankConfig": "globe.fit.config", "SparsityConfig": "globe.fit.config",
          "TrainConfig": "globe.fit.config", "fit_family": "globe.fit.engine", "fit_model": "globe.fit.engine",
          "FamilyFit": "globe.core.result", "FitResult": "globe.core.result", "apply_globe": "globe.runtime",
          "export_dense": "globe.export", "load_compressed": "globe.export", "save_compressed": "globe.export",
          "evaluate": "globe.eval"}

__all__ = ["fit_model", "fit_family", "save", "load", "FitConfig", "BankConfig", "SparsityConfig", "TrainConfig",
           "FitResult", "FamilyFit", "GlobeError", "apply_globe", "load_compressed", "save_compressed", "export_dense",
           "evaluate"]

_install_hooks()            # quant_method "globe" for from_pretrained and the peft guard, without importing either


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"globe.{name}") is not None:       # a subpackage: globe.eval, globe.runtime, ...
        return importlib.import_module(f"globe.{name}")
    raise AttributeError(f"module 'globe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
